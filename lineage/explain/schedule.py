"""Blend weights as a merge tool sets them: per layer and component, on a schedule.

A merge tool gives one value to every tensor that one setting covers: a
layer's attention matrices share one weight, its MLP matrices one (mergekit's
`filter: self_attn` / `filter: mlp`), and across layers the value follows a
gradient (`value: [0.2, 0.8]`: anchors spread evenly over t = layer /
(layers - 1), interpolated linearly between them). So a blend is judged on
whether its weights agree *within* the groups one setting covers (a layer's
component), not on whether they are constant: the spread within groups
(`within_sd`) is what a merge does not make, while two fine-tunes of one base
(whose deltas merely correlate) give weights that scatter from one matrix to
the next.

Across layers the weights are then described by the simplest schedule that
reproduces every group within SCHEDULE_TOL: constant, linear (two anchors),
piecewise linear (k evenly spaced anchors, fewer than the layers), the same
for all components or one per component, else free per layer. The anchors
are the values a mergekit configuration would be given.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from lineage.explain.thresholds import SCHEDULE_TOL

#: Components a merge configuration addresses separately (the rest: embeddings, head, norms).
STACK_COMPONENTS = ("attention", "mlp", "expert", "router")


def hat_basis(ts: np.ndarray, k: int) -> np.ndarray:
    """Columns: the k piecewise-linear hat functions on anchors evenly spaced over [0, 1]."""
    if k == 1:
        return np.ones((len(ts), 1))
    knots = np.linspace(0.0, 1.0, k)
    h = 1.0 / (k - 1)
    return np.clip(1.0 - np.abs(ts[:, None] - knots[None, :]) / h, 0.0, None)


def fit_anchors(ts: np.ndarray, ys: np.ndarray, ws: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Weighted least-squares anchors of a k-anchor schedule, and its values at ts; None if not identifiable."""
    a = hat_basis(ts, k)
    sw = np.sqrt(ws)[:, None]
    if np.linalg.matrix_rank(a * sw) < k:
        return None
    anchors = np.linalg.lstsq(a * sw, ys * sw[:, 0], rcond=None)[0]
    return anchors, a @ anchors


def simplest(ts: np.ndarray, ys: np.ndarray, ws: np.ndarray, layers: int, tol: np.ndarray) -> dict:
    """The fewest anchors (fewer than the distinct layers) that reproduce every point within tol."""
    distinct = len(set(ts.tolist()))
    for k in range(1, max(1, distinct - 1) + 1):
        fit = fit_anchors(ts, ys, ws, k)
        if fit is None:
            continue
        anchors, pred = fit
        dev = np.abs(pred - ys)
        if np.all(dev <= tol):
            kind = "constant" if k == 1 else "linear" if k == 2 else "piecewise"
            return {"kind": kind, "anchors": [round(float(x), 4) for x in anchors], "max_deviation": round(float(dev.max()), 6)}
    return {"kind": "per_layer", "anchors": None, "max_deviation": None}


def schedule(points: list[tuple[int | None, str, float, float | None, float]], layers: int) -> dict:
    """One parent's schedule from its per-matrix weights (layer, component, weight, se, elements).

    Returns the per-layer weight of every stack component, the weights of
    the tensors outside the stack, the spread within the groups one setting
    covers, and the simplest schedule: shared by the components, else per
    component."""
    groups: dict[tuple[str, int], list[tuple[float, float | None, float]]] = defaultdict(list)
    outside: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for layer, comp, w, se, n in points:
        if layer is not None and comp in STACK_COMPONENTS:
            groups[(comp, layer)].append((w, se, n))
        else:
            outside[comp].append((w, n))
    dev2 = total = 0.0
    cells: dict[str, dict[int, tuple[float, float, float]]] = defaultdict(dict)
    for (comp, layer), vs in groups.items():
        n = sum(x[2] for x in vs)
        mean = sum(x[0] * x[2] for x in vs) / n
        dev2 += sum(x[2] * (x[0] - mean) ** 2 for x in vs)
        total += n
        se = math.sqrt(sum((x[2] * (x[1] or 0.0)) ** 2 for x in vs)) / n
        cells[comp][layer] = (mean, se, n)
    out: dict = {
        "within_sd": round(math.sqrt(dev2 / total), 6) if total else None,
        "per_layer": {c: {str(i): round(v[i][0], 4) for i in sorted(v)} for c, v in sorted(cells.items())},
        "outside_stack": {c: round(sum(w * n for w, n in v) / sum(n for _, n in v), 4) for c, v in sorted(outside.items())},
    }
    if not cells:
        out.update(kind="constant" if not outside else "per_tensor", anchors=None, components={})
        return out
    span = max(1, layers - 1)

    def arrays(comps: list[str]) -> tuple[np.ndarray, ...]:
        rows = [(i / span, *cells[c][i]) for c in comps for i in sorted(cells[c])]
        ts, ys, se, ws = (np.array(x, dtype=float) for x in zip(*rows, strict=True))
        return ts, ys, ws / ws.sum(), np.maximum(SCHEDULE_TOL, 3.0 * se)

    comps = sorted(cells)
    ts, ys, ws, tol = arrays(comps)
    shared = simplest(ts, ys, ws, layers, tol)
    per = {}
    for c in comps:
        t_c, y_c, w_c, tol_c = arrays([c])
        per[c] = simplest(t_c, y_c, w_c, layers, tol_c)
    if shared["kind"] != "per_layer" or len(comps) == 1:
        out.update(kind=shared["kind"], anchors=shared["anchors"], components=per)
    elif all(p["kind"] != "per_layer" for p in per.values()):
        out.update(kind="per_component", anchors=None, components=per)
    else:
        out.update(kind="per_layer", anchors=None, components=per)
    return out


def describe(name: str, s: dict) -> str:
    """One clause for the explanation: how `name`'s weight runs over the stack."""
    if s["kind"] == "constant":
        return f"{name} constant at {s['anchors'][0]:.3f}" if s.get("anchors") else f"{name} constant"
    if s["kind"] in ("linear", "piecewise"):
        return f"{name} {s['kind']} over the layers, anchors {s['anchors']}"
    if s["kind"] == "per_component":
        return f"{name} by component (" + "; ".join(f"{c}: {describe_anchors(p)}" for c, p in s["components"].items()) + ")"
    return f"{name} set layer by layer"


def describe_anchors(p: dict) -> str:
    if p["kind"] == "per_layer":
        return "per layer"
    return f"{p['anchors'][0]:.3f}" if p["kind"] == "constant" else f"{p['kind']} {p['anchors']}"
