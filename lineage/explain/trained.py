"""A merge trained afterwards: a blend that leaves more residual than a merge does.

A merge fine-tuned further (or sparsified, then trained, so that no element
keeps the base's or a parent's value) is still explained mostly by its
parents, but the remainder is larger than an exact merge leaves: up to
TRAINED_GAIN of the best single parent's residual, where a plain blend must
reach BLEND_GAIN. blendfit.py accepts it only when two or more parents other
than the base each carry a large, tight share (a fine-tune audited against
its base and a sibling puts its weight on the base and one sibling), and the
weights agree within the groups a merge setting covers. The merge method
cannot be told from the projection that remains: `method: unknown`.
"""

from __future__ import annotations

from lineage.explain.base import Explanation, document
from lineage.explain.blendfit import blend_fit, blend_parents, extras, intervals, is_blend, tail
from lineage.explain.evidence import Evidence


class TrainedMerge(Explanation):
    name = "trained_merge"

    def explain(self, ev: Evidence) -> dict | None:
        if not is_blend(ev) or not blend_fit(ev).trained:
            return None
        fit, parents = blend_fit(ev), blend_parents(ev)
        desc = " + ".join(f"{p['weight']:.3f} x {p['name']}" for p in parents)
        return document(
            ev,
            "blend",
            parents,
            f"{ev.suspect} is a merge of {', '.join(p['name'] for p in parents)}, changed afterwards (trained further, "
            f"or sparsified and trained): its linear fit is {desc} (95% intervals {intervals(parents)})." + tail(ev),
            method="unknown",
            base=fit.base,
            **extras(ev),
        )
