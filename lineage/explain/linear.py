"""Linear blend: the suspect is a fixed mix of two or more parents.

What remains of a blend once sparse merges, task arithmetic and slerp have
passed. For two parents a few degrees apart the explanation adds that a
slerp at the same t would be indistinguishable (slerp.py).
"""

from __future__ import annotations

from lineage.explain.base import Explanation, document
from lineage.explain.blendfit import blend_fit, blend_parents, extras, intervals, is_blend, tail
from lineage.explain.evidence import Evidence
from lineage.explain.slerp import interpolation
from lineage.explain.thresholds import SLERP_MIN_SE


class Linear(Explanation):
    name = "linear"

    def explain(self, ev: Evidence) -> dict | None:
        if not is_blend(ev):
            return None
        fit, parents = blend_fit(ev), blend_parents(ev)
        text = tail(ev)
        if len(parents) == 2:
            b = parents[1]["name"]
            interp = interpolation(ev, parents[0]["name"], b)
            if interp is not None and interp["median_predicted_excess"] < SLERP_MIN_SE * interp["median_se"]:
                text += (
                    f" A slerp at t = {fit.weights[b]['mean']:.3f} would be indistinguishable: the parents are "
                    f"{interp['median_theta_deg']:.1f} degrees apart, where it departs from linear interpolation "
                    f"by {interp['median_predicted_excess']:.1e} (mergekit itself interpolates linearly below 1.8 "
                    "degrees); its t is then the weight of " + b + "."
                )
        total = fit.evidence.get("weights_sum")
        if total is not None:  # the free fit: weights not normalised to sum to 1
            text = (
                f" Its weights sum to {total:.3f}, not 1 (a linear merge whose weights were not normalised, "
                "mergekit's normalize: false): the blend with weights summing to 1 explains no more than one parent." + text
            )
        desc = " + ".join(f"{p['weight']:.3f} x {p['name']}" for p in parents)
        return document(
            ev,
            "blend",
            parents,
            f"{ev.suspect} is a linear blend: {desc} (95% intervals {intervals(parents)})." + text,
            method="linear",
            base=fit.base,
            **extras(ev),
        )
