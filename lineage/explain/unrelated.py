"""Unrelated (or inconclusive) when no candidate is related.

Unrelated needs every candidate significant on at most UNRELATED_FRAC of
the matrices and at least MIN_COVERAGE of the suspect's elements compared;
a candidate significant on part of the matrices, or too little compared,
is inconclusive, with the reason.
"""

from __future__ import annotations

from lineage.explain.base import Explanation, document
from lineage.explain.evidence import Evidence
from lineage.explain.thresholds import MIN_COVERAGE, UNRELATED_FRAC, Z_SIG


class Unrelated(Explanation):
    name = "unrelated"

    def explain(self, ev: Evidence) -> dict | None:
        if ev.related:
            return None
        per, cov = ev.per, ev.coverage
        partial = [n for n in ev.reps if per[n].frac_significant > UNRELATED_FRAC]
        if partial or cov["elements_compared_frac"] < MIN_COVERAGE or not any(per[n].matrices for n in ev.reps):
            if partial:
                why = f"{', '.join(partial)} correlate significantly on only part of the matrices"
            elif not any(per[n].matrices for n in ev.reps):
                why = "none of its compared tensors is a matrix, and 1-D tensors (norms, biases) never decide"
            else:
                why = f"only {cov['elements_compared_frac']:.0%} of its elements could be compared"
            return document(ev, "inconclusive", [], f"Neither related nor clearly unrelated: {why}.")
        zmax = max((abs(per[n].median_z or 0.0) for n in ev.reps), default=0.0)
        return document(
            ev,
            "unrelated",
            [],
            f"{ev.suspect} is unrelated to every candidate: median |z| at most {zmax:.1f} against the null of "
            f"unrelated tensors (threshold {Z_SIG:g}), over {cov['tensors_compared']} compared tensors.",
        )
