"""The verdict broken down by component and by layer of the main stack.

Per component (attention, mlp, expert, router, norm, embedding, head):
tensor counts, each candidate's median correlation and, for a blend, each
parent's weight over that component's tensors. Per layer: the parents'
weights over that layer's matrices. This is where a merge whose weights
differ by layer or component shows it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from lineage.explain.evidence import median, weighted

if TYPE_CHECKING:
    from lineage.explain.evidence import Evidence, Row
    from lineage.fit import Blend


def weights_of(fits: list[tuple[Row, Blend]], use: list[str]) -> dict:
    """Numel-weighted mean and spread of each candidate's weight over `fits`."""
    out = {}
    for n in use:
        vals = [(b.weights[n], b.se[n], float(r.numel)) for r, b in fits]
        if vals:
            out[n] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in weighted(vals).items() if k != "ci95"}  # type: ignore[arg-type]
    return out


def components(ev: Evidence, parents: list[dict]) -> tuple[dict, dict]:
    """({component: counts, median correlations, weights}, {layer: weights}) for `parents`."""
    use = [p["name"] for p in parents]
    base = ev.declared if ev.declared in ev.reps else None
    fits = ev.refits(use, base, ev.free_weights) if len(use) >= 2 else []
    by: dict[str, list[Row]] = defaultdict(list)
    for r in ev.rows:
        by[r.component].append(r)
    comps = {}
    for comp, rs in sorted(by.items()):
        ok = [r for r in rs if r.status == "ok"]
        d: dict = {"tensors": len(rs), "tensors_compared": len(ok)}
        corr = {}
        for n in ev.names:
            cs = [c.corr for r in ok for c in r.cands if c.candidate == n and c.status == "ok"]
            if cs:
                corr[n] = median(cs)
        d["median_corr"] = corr
        if fits:
            d["weights"] = weights_of([(r, b) for r, b in fits if r.component == comp], use)
        comps[comp] = d
    layers: dict[str, dict] = {}
    for layer in sorted({r.layer for r, _ in fits if r.layer is not None and r.ndim >= 2}):
        w = weights_of([(r, b) for r, b in fits if r.layer == layer and r.ndim >= 2], use)
        layers[str(layer)] = {n: v["mean"] for n, v in w.items()}
    return comps, layers
