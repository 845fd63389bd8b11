"""Three small plots as SVG text: a heatmap, values with intervals, a histogram.

Why not matplotlib: the report needs three plain kinds of plot, and
matplotlib would add tens of MB and a second of import to every install
(workers included) to draw them as raster images. SVG written here is a
few KB per plot, vector-sharp at any zoom, deterministic (the same audit
gives the same bytes), and embeds in a self-contained page as a data URI.
"""

from __future__ import annotations

import base64
import math
from html import escape

W, H = 640, 300
PAD_L, PAD_R, PAD_T, PAD_B = 110, 20, 30, 40
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def _frame(title: str, body: str, w: int = W, h: int = H) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'font-family="sans-serif" font-size="11"><rect width="{w}" height="{h}" fill="white"/>'
        f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>{body}</svg>'
    )


def _color(v: float | None, lo: float, hi: float, sequential: bool = False) -> str:
    """Diverging: white at the middle of [lo, hi], blue below, red above. Sequential:
    white at lo to red at hi. Grey for missing."""
    if v is None or not math.isfinite(v):
        return "#dddddd"
    t = 0.0 if hi == lo else max(0.0, min(1.0, (v - lo) / (hi - lo)))
    if sequential:
        t = 0.5 + t / 2
    if t < 0.5:
        a = 1 - 2 * t
        return f"rgb({int(255 - 190 * a)},{int(255 - 120 * a)},255)"
    a = 2 * t - 1
    return f"rgb(255,{int(255 - 190 * a)},{int(255 - 190 * a)})"


def heatmap(
    title: str,
    rows: list[str],
    cols: list[str],
    cells: dict[tuple[str, str], float],
    lo: float,
    hi: float,
    fmt: str = "{:.2f}",
    sequential: bool = False,
    ylabel: str = "layer",
) -> str:
    """Rows x cols of colored cells with their values written in."""
    h = max(H, PAD_T + PAD_B + 22 * len(rows))
    cw = (W - PAD_L - PAD_R) / max(1, len(cols))
    ch = (h - PAD_T - PAD_B) / max(1, len(rows))
    out = []
    for i, r in enumerate(rows):
        y = PAD_T + i * ch
        out.append(f'<text x="{PAD_L - 6}" y="{y + ch / 2 + 4}" text-anchor="end">{escape(r)}</text>')
        for j, c in enumerate(cols):
            x = PAD_L + j * cw
            v = cells.get((r, c))
            fill = _color(v, lo, hi, sequential)
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cw:.1f}" height="{ch:.1f}" fill="{fill}" stroke="white"/>')
            if v is not None and math.isfinite(v) and ch >= 12:
                out.append(
                    f'<text x="{x + cw / 2:.1f}" y="{y + ch / 2 + 4:.1f}" text-anchor="middle">{escape(fmt.format(v))}</text>'
                )
    for j, c in enumerate(cols):
        out.append(f'<text x="{PAD_L + (j + 0.5) * cw:.1f}" y="{h - PAD_B + 16}" text-anchor="middle">{escape(c)}</text>')
    mid = PAD_T + (h - PAD_T - PAD_B) / 2
    out.append(f'<text x="16" y="{mid:.1f}" transform="rotate(-90 16 {mid:.1f})" text-anchor="middle">{escape(ylabel)}</text>')
    return _frame(title, "".join(out), h=h)


def intervals(title: str, xs: list[str], series: dict[str, list[tuple[float, float, float] | None]], ylabel: str) -> str:
    """Per series, a point with its interval at each x (None: missing), joined by a line."""
    vals = [v for s in series.values() for p in s if p is not None for v in p if math.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    pad = (hi - lo) * 0.1
    lo, hi = lo - pad, hi + pad
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def X(i: int) -> float:
        return PAD_L + (i + 0.5) * pw / max(1, len(xs))

    def Y(v: float) -> float:
        return PAD_T + (hi - v) / (hi - lo) * ph

    out = [f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + ph}" stroke="black"/>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        out.append(f'<text x="{PAD_L - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
        out.append(f'<line x1="{PAD_L}" y1="{Y(v):.1f}" x2="{PAD_L + pw}" y2="{Y(v):.1f}" stroke="#eeeeee"/>')
    out.append(
        f'<text x="14" y="{PAD_T + ph / 2}" transform="rotate(-90 14 {PAD_T + ph / 2})" text-anchor="middle">{escape(ylabel)}</text>'
    )
    for i, x in enumerate(xs):
        out.append(f'<text x="{X(i):.1f}" y="{H - PAD_B + 16}" text-anchor="middle">{escape(x)}</text>')
    for k, (name, pts) in enumerate(series.items()):
        c = PALETTE[k % len(PALETTE)]
        line = [f"{X(i):.1f},{Y(p[0]):.1f}" for i, p in enumerate(pts) if p is not None]
        if len(line) > 1:
            out.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        for i, p in enumerate(pts):
            if p is None:
                continue
            m, a, b = p
            out.append(f'<line x1="{X(i):.1f}" y1="{Y(a):.1f}" x2="{X(i):.1f}" y2="{Y(b):.1f}" stroke="{c}" stroke-width="2"/>')
            out.append(f'<circle cx="{X(i):.1f}" cy="{Y(m):.1f}" r="3" fill="{c}"/>')
        out.append(f'<text x="{PAD_L + 8 + 130 * k}" y="{H - 8}" fill="{c}">{escape(name)}</text>')
    return _frame(title, "".join(out))


def histogram(title: str, values: list[float], threshold: float | None = None, bins: int = 40) -> str:
    """Counts of `values` in equal bins, with a vertical line at `threshold`."""
    vals = [v for v in values if math.isfinite(v)]
    lo, hi = (min(vals + [0.0]), max(vals + [threshold or 0.0, 1.0])) if vals else (0.0, 1.0)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in vals:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    top = max(counts) or 1
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def X(v: float) -> float:
        return PAD_L + (v - lo) / (hi - lo) * pw if hi > lo else PAD_L

    out = [f'<line x1="{PAD_L}" y1="{PAD_T + ph}" x2="{PAD_L + pw}" y2="{PAD_T + ph}" stroke="black"/>']
    for i, n in enumerate(counts):
        h = n / top * ph
        out.append(
            f'<rect x="{X(lo + i * width):.1f}" y="{PAD_T + ph - h:.1f}" width="{pw / bins:.1f}" height="{h:.1f}" fill="#1f77b4"/>'
        )
    for v in (lo, (lo + hi) / 2, hi):
        out.append(f'<text x="{X(v):.1f}" y="{H - PAD_B + 16}" text-anchor="middle">{v:.1f}</text>')
    out.append(f'<text x="{PAD_L - 6}" y="{PAD_T + 8}" text-anchor="end">{top}</text>')
    if threshold is not None and lo <= threshold <= hi:
        x = X(threshold)
        out.append(f'<line x1="{x:.1f}" y1="{PAD_T}" x2="{x:.1f}" y2="{PAD_T + ph}" stroke="#d62728" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{x + 4:.1f}" y="{PAD_T + 12}" fill="#d62728">threshold {threshold:g}</text>')
    return _frame(title, "".join(out))
