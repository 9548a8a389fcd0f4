"""The README's Python examples run as written and print what they claim."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
EXTRAS = ("torch", "jax")
"""Modules of optional extras (pyproject's [torch], [jax]): the README's install command
(".[test]") leaves them out, so a block importing one is skipped without it."""


def _missing_extra(block: str) -> str | None:
    imported = set(re.findall(r"^\s*(?:import|from) (\w+)", block, re.M))
    return next((name for name in EXTRAS
                 if name in imported and importlib.util.find_spec(name) is None), None)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    missing = _missing_extra(BLOCKS[index])
    if missing:
        pytest.skip(f"needs {missing}: pip install -e \".[{missing}]\"")
    script = tmp_path / f"readme_{index}.py"
    script.write_text(BLOCKS[index])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", result.stdout).groups())
    assert last < 0.6 * first  # the demo's loss falls from ~33.8 to ~14.0 in 20 epochs


def test_readme_has_the_examples():
    assert len(BLOCKS) >= 2
