"""The benchmark's connectivity section (``python -m benchmarks --connectivity``) fills its
table from the example's two cases, with accurate gradients."""

from __future__ import annotations

import re

import pytest


@pytest.mark.slow
def test_connectivity_section_quick():
    from benchmarks.connectivity import connectivity_table

    table = connectivity_table(repeat=1, quick=True, markdown=True, threads=1,
                               log=lambda message: None)
    lines = table.splitlines()
    assert lines[0].startswith("| case | method | time [s]")
    ours = [line for line in lines if "diagode-dist" in line]
    assert len(ours) == 2  # the forum case and the graph case
    errors = [float(re.search(r"\| ([0-9.e+-]+) \(", line).group(1)) for line in ours]
    assert errors[0] <= 1e-10 and errors[1] <= 1e-8
