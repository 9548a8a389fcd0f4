"""Which module may import what: checked in fresh interpreters, so nothing is loaded already."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diagode_dist"


def _python(code: str, cwd: Path | None = None) -> None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_loading_a_problem_from_files_does_not_import_dask(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "A0.npy", 0.1 * rng.standard_normal((6, 6)))
    np.save(tmp_path / "F.npy", rng.standard_normal((6, 4)))
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2, 3]))
    _python("""
        import sys
        import diagode_dist.files
        from diagode_dist.files import ProblemFiles
        files = ProblemFiles("A0.npy", "F.npy", "labels.npy").validate()
        piece = files.load_shard(slice(1, 3))
        assert piece.S == 2 and files.n == 6
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("dask", "distributed"))
        assert not heavy, heavy
    """, cwd=tmp_path)


def test_import_diagode_dist_does_not_import_dask():
    _python("""
        import sys
        import diagode_dist as dd
        dd.TrainOptions(lr=0.1)
        assert "distributed" not in sys.modules and "dask" not in sys.modules
    """)


def test_the_rpc_client_does_not_import_the_scheduler_side():
    _python("""
        import sys
        import diagode_dist.service.client
        import diagode_dist.service.session
        scheduler_side = [m for m in sys.modules if m in (
            "diagode_dist.service.server", "diagode_dist.service.dashboard",
            "diagode_dist.service.page", "diagode_dist.service.metrics",
            "diagode_dist.service.runs")]
        assert not scheduler_side, scheduler_side
    """)


def test_the_page_renderer_is_pure():
    _python("""
        import sys
        from diagode_dist.service.page import render_page
        assert "No training runs" in render_page([])
        assert "distributed" not in sys.modules and "tornado" not in sys.modules
    """)


@pytest.mark.parametrize("module", sorted(p.name for p in (PACKAGE / "service").glob("*.py")))
def test_no_service_module_is_over_400_lines(module):
    lines = (PACKAGE / "service" / module).read_text().count("\n")
    assert lines <= 400, f"service/{module} has {lines} lines"


def test_one_place_installs_the_scheduler_plugins():
    installers = [path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
                  if "def dask_setup" in path.read_text()
                  or "register_plugin(" in path.read_text()]
    assert installers == ["service/plugin.py"]
