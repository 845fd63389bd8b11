"""Task arithmetic: a blend with one candidate at a clearly negative weight, its base.

A task-arithmetic merge is s = b + sum_i l_i (p_i - b); seen as an affine
blend, the base's own weight is 1 - sum_i l_i, negative when the task
weights sum past 1. A candidate at most -MIN_WEIGHT with its interval
below 0 is that base. (Weights summing to exactly 1 make the same merge a
linear one, and it is reported as linear.)

Which candidate is the base is a choice of coordinates: b + (p1 - b) -
0.5 (p2 - b) is also p2 + (p1 - p2) + 0.5 (b - p2). Where the model set
declares a base and the fit holds a negative weight, the merge is written
on the declared base, with a negative task weight where the recipe has
one (task negation, "forgetting" a fine-tune); so is a blend in which the
declared base keeps a positive share beside two or more fine-tunes (task
weights summing below 1: base + 0.3 (p1 - base) + 0.3 (p2 - base) is the
linear blend 0.4 / 0.3 / 0.3). Model Stock, whose base also keeps a share,
is tried first (the registry's order).
"""

from __future__ import annotations

from lineage.explain.base import Explanation, document
from lineage.explain.blendfit import blend_fit, blend_parents, extras, intervals, is_blend, tail
from lineage.explain.evidence import Evidence
from lineage.explain.thresholds import MIN_WEIGHT


class TaskArithmetic(Explanation):
    name = "task_arithmetic"

    def explain(self, ev: Evidence) -> dict | None:
        if not is_blend(ev) or ev.free_weights:  # weights summing away from 1 are a scaled linear merge
            return None
        fit = blend_fit(ev)
        negative = [n for n, w in fit.weights.items() if w["mean"] <= -MIN_WEIGHT and w["ci95"][1] < 0]
        declared = ev.declared if ev.declared in fit.weights else None
        tasks_of_declared = [n for n in fit.material if n != declared]
        if declared and (negative or (declared in fit.material and len(tasks_of_declared) >= 2)):
            b = declared
            tasks = [
                n
                for n, w in fit.weights.items()
                if n != b and abs(w["mean"]) >= MIN_WEIGHT and (w["ci95"][0] > 0 or w["ci95"][1] < 0)
            ]
            parents = blend_parents(ev, tasks)
        elif len(negative) == 1:
            b, parents = negative[0], blend_parents(ev)
        else:
            return None
        desc = b + "".join(f" {'-' if p['weight'] < 0 else '+'} {abs(p['weight']):.3f} x ({p['name']} - {b})" for p in parents)
        return document(
            ev,
            "blend",
            parents,
            f"{ev.suspect} is a task-arithmetic merge on base {b}: {desc} (95% intervals {intervals(parents)}; "
            f"{b}'s own weight is {fit.weights[b]['mean']:.3f})." + tail(ev),
            method="task_arithmetic",
            base=b,
            **extras(ev),
        )
