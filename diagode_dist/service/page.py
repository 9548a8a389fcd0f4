"""The training page's HTML: a pure function of the runs' status dicts (no Dask, no I/O).

Plain HTML with inline SVG drawn here: no scripts, no network fetches (the dashboard's
Content-Security-Policy forbids them); every value taken from a status is escaped.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping, Sequence

from diagode_dist.service.protocol import RunStatus

__all__ = ["render_page", "DEFAULT_REFRESH_S", "STATUS_JSON"]

STATUS_JSON = "diagode/status.json"
DEFAULT_REFRESH_S = 2


# ---- the page ------------------------------------------------------------------------------

def render_page(statuses: Sequence[RunStatus], installed: bool = True, prefix: str = "/",
                refresh: int = DEFAULT_REFRESH_S, address: str = "",
                traces: Mapping[str, Sequence[tuple[int, float]]] | None = None) -> str:
    """The HTML of the training page.

    statuses: the runs' status dicts; traces: run_id -> per-step (step, loss), for the loss
    curves (optional); installed: False when the scheduler has no parameter server.
    """
    traces = traces or {}
    runs = sorted(statuses, key=lambda s: (s["status"] != "running", -(s.get("started") or 0)))
    if not installed:
        body = ('<p class="note">The diagode parameter server is not installed on this '
                'scheduler yet: submit a run (<code>diagode_dist.submit</code>) or start the '
                'scheduler with <code>--preload diagode_dist.service.dashboard</code>.</p>')
    elif not runs:
        body = '<p class="note">No training runs on this scheduler yet.</p>'
    else:
        body = "\n".join(_run_card(status, traces.get(status["run_id"], ())) for status in runs)
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    updated = time.strftime("%Y-%m-%d %H:%M:%S")
    running = sum(s["status"] == "running" for s in runs)
    links = (f'<a href="{_e(prefix + STATUS_JSON)}">status.json</a> · '
             f'<a href="{_e(prefix)}metrics">metrics</a> · '
             f'<a href="{_e(prefix)}status">Dask dashboard</a>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{meta}
<title>diagode training ({running} running)</title>
<style>{_CSS}</style></head>
<body>
<header><h1>diagode training</h1>
<p class="sub">scheduler {_e(address)} · {len(runs)} run(s), {running} running ·
updated <span id="updated">{updated}</span>{f" · refreshes every {refresh} s" if refresh else ""}
 · {links}</p></header>
<main>
{body}
</main></body></html>
"""


def _run_card(status: RunStatus, trace: Sequence[tuple[int, float]]) -> str:
    run_id, state = str(status["run_id"]), str(status["status"])
    step, n_steps = status.get("step") or 0, status.get("n_steps") or 0
    history = status.get("history") or []
    done = 100.0 * step / n_steps if n_steps else 0.0
    facts = [
        ("status", "status", state, _e(state)),
        ("step", "step", step, f"{step:,} / {n_steps:,}"),
        ("epoch", "epoch", status.get("epoch"),
         _e(f"{status.get('epoch', 0):,} / {status.get('epochs', 0):,}")),
        ("loss (last step)", "loss", status.get("loss"), _num(status.get("loss"))),
        ("loss (last epoch)", "epoch_loss", history[-1] if history else None,
         _num(history[-1] if history else None)),
        ("gradient norm", "grad_norm", status.get("grad_norm"), _num(status.get("grad_norm"))),
        ("steps/s", "steps_per_s", status.get("steps_per_s"),
         _num(status.get("steps_per_s"), 3)),
        ("step time (last / mean)", "last_step_s", status.get("last_step_s"),
         f"{_duration(status.get('last_step_s'))} / {_duration(status.get('mean_step_s'))}"),
        ("ETA", "eta_s", status.get("eta_s"),
         _duration(status.get("eta_s")) if state == "running" else "—"),
        ("elapsed", "elapsed_s", status.get("elapsed_s"), _duration(status.get("elapsed_s"))),
        ("problem", "n", status.get("n"),
         _e(f"n = {status.get('n')}, S = {status.get('S')}, batch {status.get('batch_size')}, "
            f"{status.get('n_shards')} shard(s)")),
    ]
    if status.get("checkpoint"):
        facts.append(("checkpoint", "checkpoint_step", status.get("checkpoint_step"),
                      _e(f"step {status.get('checkpoint_step')} · {status['checkpoint']}")))
    rows = "\n".join(
        f'<tr><th>{label}</th><td data-field="{field}" data-value="{_e(_value(value))}">'
        f"{text}</td></tr>" for label, field, value, text in facts)
    error = (f'<p class="error" data-field="error">{_e(status["error"])}</p>'
             if status.get("error") else "")
    return f"""<section class="run" id="run-{_e(run_id)}" data-run-id="{_e(run_id)}"
 data-status="{_e(state)}">
<h2>run <code>{_e(run_id)}</code> <span class="badge {_e(state)}">{_e(state)}</span></h2>
<div class="progress" title="{done:.1f}% of the steps"><div style="width:{done:.2f}%"></div></div>
{error}
<div class="grid">
<div class="left">
<table class="facts">
{rows}
</table>
<figure><figcaption>per-shard time of the last step</figcaption>{_shard_chart(status)}</figure>
</div>
<figure><figcaption>loss</figcaption>{_loss_chart(status, trace)}</figure>
</div>
</section>"""


def _value(value) -> str:
    """Exact machine-readable value for data-value attributes (repr of floats round-trips)."""
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


# ---- inline SVG charts ---------------------------------------------------------------------

_W, _H = 620, 300  # loss chart
_BAR_W = 440  # per-shard chart
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 14, 12, 40
_MAX_POINTS = 600


def _loss_chart(status: RunStatus, trace_steps: Sequence[tuple[int, float]]) -> str:
    """Per-epoch mean loss (and per-step loss if the server keeps a trace) against epochs."""
    per_epoch = [(i + 1.0, h) for i, h in enumerate(status.get("history") or [])]
    steps_per_epoch = status.get("steps_per_epoch") or 1
    trace = [(s / steps_per_epoch, loss) for s, loss in trace_steps]
    series = [(_thin(trace), "trace"), (_thin(per_epoch), "epoch")]
    points = [p for pts, _ in series for p in pts if _finite(p[1])]
    if len(points) < 2:
        return _empty_chart("the curve starts after the first epochs")
    (x0, x1), (y0, y1) = _span([p[0] for p in points]), _span([p[1] for p in points])
    xs, ys = _ticks(x0, x1, min_step=1.0), _ticks(y0, y1)  # whole epochs on the x axis
    x0, x1 = min(x0, xs[0]), max(x1, xs[-1])
    y0, y1 = min(y0, ys[0]), max(y1, ys[-1])

    def sx(x):
        return _LEFT + (x - x0) / (x1 - x0) * (_W - _LEFT - _RIGHT)

    def sy(y):
        return _H - _BOTTOM - (y - y0) / (y1 - y0) * (_H - _TOP - _BOTTOM)

    parts = [_axes(xs, ys, sx, sy, "epoch", "mean loss")]
    for pts, css in series:
        pts = [p for p in pts if _finite(p[1])]
        if len(pts) >= 2:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline class="{css}" points="{coords}"/>')
    if len(trace) >= 2:
        parts.append(_legend([("trace", "each step"), ("epoch", "epoch mean")]))
    last = per_epoch[-1] if per_epoch else trace[-1]
    parts.append(f'<circle class="last" cx="{sx(last[0]):.1f}" cy="{sy(last[1]):.1f}" r="3.5">'
                 f"<title>epoch {last[0]:g}: {last[1]:.6g}</title></circle>")
    return _svg("loss curve", "".join(parts))


def _shard_chart(status: RunStatus) -> str:
    """Horizontal bars: compute (forward + adjoint) and theta-wait time of each shard."""
    timings = status.get("shard_timings") or []
    restarts = status.get("shard_restarts") or [0] * len(timings)
    if not any(t.get("compute_s") is not None for t in timings):
        return _empty_chart("no step measured yet", _BAR_W)
    shown = timings[:32]
    row, top, label_w, value_w = 20, 10, 62, 150
    height = top + row * len(shown) + 34
    longest = max((t.get("compute_s") or 0) + (t.get("pull_s") or 0) for t in shown) or 1.0
    scale = (_BAR_W - label_w - value_w) / longest
    parts = []
    for shard, timing in enumerate(shown):
        y = top + shard * row
        compute, pull = timing.get("compute_s") or 0.0, timing.get("pull_s") or 0.0
        restart = f" · {restarts[shard]} restart(s)" if shard < len(restarts) and \
            restarts[shard] else ""
        parts.append(
            f'<text class="label" x="{label_w - 6}" y="{y + 13}" text-anchor="end">shard {shard}'
            f'</text><rect class="compute" x="{label_w}" y="{y + 2}" width="{compute * scale:.1f}"'
            f' height="{row - 6}"><title>forward + adjoint {_duration(compute)}</title></rect>'
            f'<rect class="pull" x="{label_w + compute * scale:.1f}" y="{y + 2}" '
            f'width="{pull * scale:.1f}" height="{row - 6}"><title>waiting for theta '
            f'{_duration(pull)}</title></rect>'
            f'<text class="value" x="{label_w + (compute + pull) * scale + 6:.1f}" y="{y + 13}">'
            f"{_duration(compute)} + {_duration(pull)} wait{restart}</text>")
    y = top + len(shown) * row + 14
    more = f" · {len(timings) - len(shown)} more shard(s) not shown" if len(timings) > 32 else ""
    parts.append(f'<rect class="compute" x="{label_w}" y="{y - 9}" width="10" height="10"/>'
                 f'<text class="label" x="{label_w + 14}" y="{y}">forward + adjoint</text>'
                 f'<rect class="pull" x="{label_w + 140}" y="{y - 9}" width="10" height="10"/>'
                 f'<text class="label" x="{label_w + 154}" y="{y}">waiting for theta{more}'
                 f"</text>")
    return _svg("per-shard time", "".join(parts), height, _BAR_W)


def _axes(xs, ys, sx, sy, x_label: str, y_label: str) -> str:
    left, right, bottom = _LEFT, _W - _RIGHT, _H - _BOTTOM
    parts = [f'<line class="axis" x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}"/>',
             f'<line class="axis" x1="{left}" y1="{_TOP}" x2="{left}" y2="{bottom}"/>']
    for x in xs:
        parts.append(f'<line class="grid" x1="{sx(x):.1f}" y1="{_TOP}" x2="{sx(x):.1f}" '
                     f'y2="{bottom}"/><text class="tick" x="{sx(x):.1f}" y="{bottom + 15}" '
                     f'text-anchor="middle">{x:g}</text>')
    for y in ys:
        parts.append(f'<line class="grid" x1="{left}" y1="{sy(y):.1f}" x2="{right}" '
                     f'y2="{sy(y):.1f}"/><text class="tick" x="{left - 6}" y="{sy(y) + 4:.1f}" '
                     f'text-anchor="end">{y:.4g}</text>')
    parts.append(f'<text class="label" x="{(left + right) / 2}" y="{_H - 6}" '
                 f'text-anchor="middle">{x_label}</text>'
                 f'<text class="label" transform="translate(14 {(_TOP + bottom) / 2}) '
                 f'rotate(-90)" text-anchor="middle">{y_label}</text>')
    return "".join(parts)


def _legend(entries: list[tuple[str, str]]) -> str:
    """Short line samples with labels, top right of the plot area."""
    x, parts = _W - _RIGHT - 200, []
    for i, (css, label) in enumerate(entries):
        parts.append(f'<polyline class="{css}" points="{x + i * 100},{_TOP + 12} '
                     f'{x + i * 100 + 18},{_TOP + 12}"/><text class="label" '
                     f'x="{x + i * 100 + 23}" y="{_TOP + 16}">{_e(label)}</text>')
    return "".join(parts)


def _svg(title: str, content: str, height: int = _H, width: int = _W) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}"><title>{_e(title)}</title>'
            f"{content}</svg>")


def _empty_chart(message: str, width: int = _W) -> str:
    return _svg(message, f'<text class="label" x="{width / 2}" y="40" text-anchor="middle">'
                         f"{_e(message)}</text>", 70, width)


def _thin(points: list, limit: int = _MAX_POINTS) -> list:
    """At most ``limit`` evenly strided points, always keeping the last one."""
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        pad = max(abs(high) * 0.05, 1e-3)
        return low - pad, high + pad
    return low, high


def _ticks(low: float, high: float, count: int = 5, min_step: float = 0.0) -> list[float]:
    """Round tick values covering [low, high] (about ``count`` of them, >= min_step apart)."""
    raw = max((high - low) / count, min_step)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    last = math.ceil(high / step) * step
    n = int(round((last - first) / step))
    return [round(first + i * step, 12) for i in range(n + 1)]


# ---- formatting ----------------------------------------------------------------------------

def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _num(value, digits: int = 6) -> str:
    return f"{value:.{digits}g}" if _finite(value) else "—"


def _duration(seconds) -> str:
    if not _finite(seconds):
        return "—"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours / 24:.1f} days"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 margin:0;background:#f4f5f7;color:#1d2330;font-size:14px}
header{background:#1d2b45;color:#fff;padding:12px 24px}
header h1{margin:0;font-size:20px;font-weight:600}
header .sub{margin:4px 0 0;color:#c5cde0;font-size:12.5px}
header a{color:#9cc3ff}
main{padding:16px 24px}
.note{background:#fff;padding:16px;border-radius:6px}
.run{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);
 padding:12px 18px 16px;margin-bottom:18px}
.run h2{margin:0 0 8px;font-size:16px;font-weight:600}
.badge{font-size:12px;padding:2px 8px;border-radius:10px;color:#fff;vertical-align:middle}
.badge.running{background:#2f6fde}.badge.finished{background:#1f8a4c}
.badge.failed{background:#c73232}
.progress{height:8px;background:#e3e7ee;border-radius:4px;overflow:hidden;margin-bottom:10px}
.progress div{height:100%;background:#2f6fde}
.error{background:#fdecec;color:#8c1c1c;padding:8px 10px;border-radius:4px;
 white-space:pre-wrap;font-family:monospace;font-size:12.5px}
.grid{display:flex;flex-wrap:wrap;gap:12px 28px;align-items:flex-start}
.left{display:flex;flex-direction:column;gap:12px;width:440px}
table.facts{border-collapse:collapse}
table.facts th{text-align:left;font-weight:500;color:#5b6477;padding:3px 14px 3px 0;
 white-space:nowrap}
table.facts td{font-variant-numeric:tabular-nums;padding:3px 0;max-width:420px;
 overflow-wrap:anywhere}
figure{margin:0}
figcaption{font-size:12.5px;color:#5b6477;margin-bottom:2px}
svg{background:#fbfcfd;border:1px solid #e3e7ee;border-radius:4px}
svg .axis{stroke:#8791a5;stroke-width:1}
svg .grid{stroke:#e6e9ef;stroke-width:1}
svg .tick{fill:#5b6477;font-size:11px}
svg .label{fill:#39404f;font-size:11.5px}
svg .value{fill:#39404f;font-size:11px}
svg polyline{fill:none;stroke-linejoin:round}
svg polyline.trace{stroke:#9dbcf0;stroke-width:1}
svg polyline.epoch{stroke:#2f6fde;stroke-width:2}
svg circle.last{fill:#c73232}
svg rect.compute{fill:#2f6fde}
svg rect.pull{fill:#c9d6ee}
"""
