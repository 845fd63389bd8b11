"""Passthrough (a layer stack): every matrix a copy of one candidate's, from two or more.

mergekit's passthrough merge stacks whole layers taken from different
models. Each matrix is then within rounding of exactly one candidate's,
and at least two candidates supply PASSTHROUGH_MIN_SHARE of the elements
each; the weights are the shares, and `layer_sources` says which model
(and layer) each layer came from. Stacks that repeat, skip or reorder
layers match no namesake: the layer-map refiner (layermap.py) finds them.
"""

from __future__ import annotations

from collections import Counter

from lineage.explain.base import Explanation, document
from lineage.explain.evidence import Evidence
from lineage.explain.thresholds import PASSTHROUGH_MIN_SHARE


def layer_stack(ev: Evidence) -> dict | None:
    mats = ev.matrices
    source: dict[str, tuple[str, object]] = {}
    for r in mats:
        within = [
            c
            for c in r.cands
            if c.candidate in ev.reps
            and c.status == "ok"
            and c.rounding_tol is not None
            and c.rel_dist is not None
            and c.rel_dist <= c.rounding_tol
        ]
        if within:
            source[r.tensor] = (min(within, key=lambda c: c.rel_dist).candidate, r)  # type: ignore[arg-type, return-value]
    if not mats or len(source) < len(mats):
        return None
    total = sum(r.numel for r in mats)
    shares: Counter = Counter()
    for name, r in source.values():
        shares[name] += r.numel / total  # type: ignore[attr-defined]
    if sum(1 for v in shares.values() if v >= PASSTHROUGH_MIN_SHARE) < 2:
        return None
    layers: dict[str, dict] = {}
    for name, r in source.values():
        if r.layer is not None:  # type: ignore[attr-defined]
            layers.setdefault(str(r.layer), {"model": name, "layer": r.layer})  # type: ignore[attr-defined]
    return {
        "shares": dict(shares.most_common()),
        "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0]))),
        "matrices": len(mats),
    }


class Passthrough(Explanation):
    name = "passthrough"

    def explain(self, ev: Evidence) -> dict | None:
        stack = layer_stack(ev)
        if stack is None:
            return None
        parents = [{"name": n, "weight": round(w, 6), "ci95": [round(w, 6), round(w, 6)]} for n, w in stack["shares"].items()]
        layers = ", ".join(f"{layer}: {src['model']}" for layer, src in stack["layers"].items())
        return document(
            ev,
            "blend",
            parents,
            f"{ev.suspect} is a layer stack (passthrough merge): each of its {stack['matrices']} matrices is a copy, within "
            f"storage rounding, of one candidate's, taken from {' and '.join(stack['shares'])} (layers {layers}); "
            "weights are the share of elements each supplies.",
            method="passthrough",
            layer_sources=stack["layers"],
        )
