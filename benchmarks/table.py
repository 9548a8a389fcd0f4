"""Aligned text tables and Markdown tables for the benchmark's output."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(header: Sequence[str], body: Sequence[Sequence[str]], markdown: bool) -> str:
    """``header`` and rows of cells (strings) as a Markdown table or space-aligned text."""
    header = list(header)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in body]
    return "\n".join(line.rstrip() for line in lines)


def heading(text: str, markdown: bool) -> str:
    """A section title: ``### text`` in Markdown, underlined text otherwise."""
    return f"### {text}" if markdown else f"{text}\n{'=' * len(text)}"
