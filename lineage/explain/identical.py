"""Identical: every compared tensor within storage rounding of one candidate.

Within rounding means bit-equal for one dtype (a small fraction of an ULP)
and the coarser dtype's roundoff across dtypes (dtypes.rounding_tolerance),
over at least IDENTICAL_COVERAGE of the suspect's float elements. A 2%
residual between two FP32 files is not rounding: that model was changed.
"""

from __future__ import annotations

from lineage.explain.base import Explanation, document, one_parent
from lineage.explain.evidence import Evidence


class Identical(Explanation):
    name = "identical"

    def explain(self, ev: Evidence) -> dict | None:
        ident = [n for n in ev.reps if ev.per[n].identical]
        if not ident:
            return None
        best = min(ident, key=lambda n: ev.per[n].median_rel_dist)  # type: ignore[arg-type, return-value]
        p = ev.per[best]
        return document(
            ev,
            "identical",
            one_parent(ev, best),
            f"{ev.suspect} equals {best} up to storage rounding: all {p.tensors} compared tensors "
            f"({p.coverage:.0%} of its elements) lie within the rounding of their dtypes "
            f"(median relative distance {p.median_rel_dist:.2e}).",
        )
