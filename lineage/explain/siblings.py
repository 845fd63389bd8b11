"""A derived suspect between its candidates: related to each, descended from none of them.

Two fine-tunes of one base, audited without it, are each other's closest
candidate, and a third fine-tune of that base audited against them sits
halfway between: in the affine blend over k siblings it weighs about 1/k on
each, whatever their deltas' correlation (for unit deltas at correlation
rho, the projection of s - p1 on p2 - p1 is (1 - rho) / (2 - 2 rho) = 1/2).
A descendant of one of them weighs about 1 on it. When the parent named by
`derived` (the closest; no declared base) weighs
less than SPLIT_MARGIN more than another related candidate, naming it would
give the suspect a parent it may not have: this refiner names none, keeps
`closest`, and says what the weights allow (a sibling of both, from an
ancestor absent from the pool, or a merge of them trained afterwards, which
the weights alone cannot tell apart without the base). A parent named by a
clearer margin that still carries less than THROUGH of the blend, another
candidate more than 1 - THROUGH, keeps its name with that doubt said.
"""

from __future__ import annotations

from lineage.explain.blendfit import blend_fit
from lineage.explain.derived import opening
from lineage.explain.evidence import Evidence
from lineage.explain.thresholds import SPLIT_MARGIN, THROUGH


class Siblings:
    name = "siblings"
    refines = True

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        return []

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        if verdict is None or verdict["verdict"] != "derived" or len(ev.related) < 2 or len(verdict["parents"]) != 1:
            return None
        if (ev.analyses.get("derived") or {}).get("parent_by") != "closest" or verdict.get("undone") or verdict.get("layer_map"):
            return None
        parent = verdict["parents"][0]["name"]
        weights = {n: w["mean"] for n, w in blend_fit(ev).weights.items()}
        if parent not in weights:
            return None
        other = max((n for n in weights if n != parent), key=lambda n: weights[n])
        if weights[parent] - weights[other] >= SPLIT_MARGIN:
            if weights[parent] >= THROUGH or weights[other] < 1 - THROUGH:
                return None
            # named, but not beyond doubt: a descendant of `parent` weighs about 1 on it
            return {
                **verdict,
                "explanation": verdict["explanation"]
                + f" {other} still carries {weights[other]:.2f} of their blend against {weights[parent]:.2f} on {parent} "
                f"(a descendant of {parent} would carry about 1 on it): {ev.suspect} may instead be a sibling of {parent} "
                f"descended from {other}, which is closer to it when siblings' deltas correlate beyond 0.5; declaring "
                "the base (base: true) decides.",
            }
        split = " / ".join(f"{n} {weights[n]:.2f}" for n in sorted(weights, key=lambda n: -weights[n]))
        ev.analyses["derived"]["parent_by"] = "none: between candidates"
        text = verdict["explanation"].replace(
            opening(ev.suspect, parent),
            f"{ev.suspect} derives from a model related to {parent} (its closest) but is not a copy",
            1,
        )
        return {
            **verdict,
            "parents": [],
            "explanation": text
            + f" No parent is named: the suspect sits between its candidates (affine weights {split}), where a sibling "
            "of them descended from an ancestor not in the pool sits (about 1/k on each of k siblings), while a "
            f"descendant of {parent} would weigh about 1 on it; a merge of them trained afterwards would sit there too. "
            "Declaring the base (base: true), if it is in the pool, decides.",
        }
