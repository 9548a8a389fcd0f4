"""examples/connectivity_ude.py runs (``--quick``) and its numbers meet the example's targets at
the small size: exact gradients, directional derivatives, a recovery that improves."""

from __future__ import annotations

import pytest
from test_examples import _is_png, run_example


@pytest.mark.slow
def test_connectivity_ude(tmp_path):
    stdout, summary = run_example("connectivity_ude.py", tmp_path)
    assert _is_png(tmp_path / "recovery.png")
    assert "forum MWE" in stdout and "random geometric graph" in stdout
    forum = summary["forum"]
    assert forum["weights"] == forum["n"] ** 2
    ours = forum["rows"][0]
    assert ours["method"].startswith("diagode-dist")
    assert ours["grad_rel_error"] <= 1e-10 and ours["loss_rel_error"] <= 1e-12
    graph = summary["graph"]
    assert max(graph["directional_rel_errors"]) <= 1e-8
    assert graph["final_weight_error"] < graph["initial_weight_error"]
    assert graph["history"][-1] < 0.5 * graph["history"][0]
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[0] == "step,mse,weight_error" and len(lines) == 1 + len(graph["history"])
