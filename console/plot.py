"""The loss curve of a training run as inline SVG, drawn on the server (no plotting library, no
JavaScript): the logged per-step loss, a smoothed line over it, and axes with a few round ticks."""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

MAX_POINTS = 400  # more steps than this are drawn as per-bucket min and max (the shape stays)


def _finite(points: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    out = []
    for p in points or []:
        try:
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            out.append((x, y))
    return out


def downsample(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most ``limit`` points: each bucket keeps its lowest and highest, in step order."""
    if len(points) <= limit:
        return points
    buckets = limit // 2
    size = len(points) / buckets
    out: list[tuple[float, float]] = []
    for b in range(buckets):
        chunk = points[int(b * size): int((b + 1) * size)]
        if not chunk:
            continue
        lo, hi = min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])
        out.extend(sorted({lo, hi}))
    return out


def smooth(points: list[tuple[float, float]], alpha: float = 0.15) -> list[tuple[float, float]]:
    """An exponential moving average, debiased at the start (as TensorBoard draws it)."""
    out, avg = [], 0.0
    for i, (x, y) in enumerate(points, 1):
        avg = (1 - alpha) * avg + alpha * y
        out.append((x, avg / (1 - (1 - alpha) ** i)))
    return out


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """Round numbers between ``lo`` and ``hi`` (1, 2, 2.5 or 5 times a power of ten apart)."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _path(points: list[tuple[float, float]], sx, sy) -> str:  # type: ignore[no-untyped-def]
    return "M" + " L".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)


def loss_svg(points: Sequence[Sequence[float]], *, width: int = 640, height: int = 220, compact: bool = False,
             title: str = "training loss") -> Markup:
    """The curve of ``points`` ([[step, loss], ...]) as an ``<svg>`` element; ``compact`` draws a
    sparkline without axes (for tables)."""
    data = downsample(_finite(points), 80 if compact else MAX_POINTS)
    if not data:
        return Markup('<span class="muted">no loss logged</span>')
    xs, ys = [p[0] for p in data], [p[1] for p in data]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad_y = (y1 - y0) * 0.06
    y0, y1 = y0 - pad_y, y1 + pad_y
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    left, right, top, bottom = (2, 2, 2, 2) if compact else (52, 14, 12, 34)
    w, h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * h

    label = f"{title}: {_fmt(data[0][1])} at step {_fmt(data[0][0])} to {_fmt(data[-1][1])} at step {_fmt(data[-1][0])}"
    parts = [f'<svg class="loss{" compact" if compact else ""}" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(label)}</title>"]
    if not compact:
        for t in nice_ticks(y0, y1):
            y = sy(t)
            parts.append(f'<line class="grid" x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}"/>')
            parts.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        for t in nice_ticks(x0, x1, 5):
            if t != int(t):
                continue
            x = sx(t)
            parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + h}"/>')
            parts.append(f'<text class="tick" x="{x:.1f}" y="{top + h + 16}" text-anchor="middle">{int(t)}</text>')
        parts.append(f'<line class="axis" x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}"/>')
        parts.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + h}"/>')
        parts.append(f'<text class="axis-label" x="{left + w / 2:.1f}" y="{height - 4}" text-anchor="middle">step</text>')
        parts.append(f'<text class="axis-label" x="12" y="{top + h / 2:.1f}" text-anchor="middle" '
                     f'transform="rotate(-90 12 {top + h / 2:.1f})">loss</text>')
    if len(data) == 1:
        parts.append(f'<circle class="loss-line" cx="{sx(data[0][0]):.1f}" cy="{sy(data[0][1]):.1f}" r="3"/>')
    else:
        smoothed = len(data) >= 12
        if not (smoothed and compact):  # a sparkline draws the trend only
            parts.append(f'<path class="{"loss-raw" if smoothed else "loss-line"}" d="{_path(data, sx, sy)}"/>')
        if smoothed:
            parts.append(f'<path class="loss-line" d="{_path(smooth(data), sx, sy)}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
