"""The benchmark's trust table: rows measured against the exact reference, rendered."""

from __future__ import annotations

from benchmarks.trust import trust_rows, trust_table


def test_trust_rows_measure_and_render():
    rows = trust_rows(["decay_x0", "wave"], rtols=(1e-8,), ks=(30,))
    assert [r.name for r in rows] == ["decay_x0", "wave"]
    for row in rows:
        assert row.returned + row.refused == 1
        assert 0 < row.worst_error_over_rtol <= 10 and 0 < row.worst_error_over_estimate <= 10
    text = trust_table(rows, markdown=True)
    assert text.splitlines()[0].startswith("| case | operator class | worst error / rtol")
    assert "| **all** | 2 classes |" in text
