"""Derived: related to one parent beyond rounding, and no blend explains more.

A fine-tune, continued training, a perturbation or a quantisation of one
parent. Related is decided by significance against the permutation null,
not a cosine threshold. A fine-tune audited against its base and a sibling
fine-tune is derived from the closest: the sibling correlates too (their
deltas share the base), but their blend fits hardly better. The closest is
not always the parent: siblings whose deltas correlate beyond 0.5 are
closer to each other than to their base. A declared base settles it
(`through`); without one, where the suspect sits between its candidates,
explain/siblings.py names no parent.
"""

from __future__ import annotations

from lineage.explain.base import Explanation, document, one_parent
from lineage.explain.blendfit import blend_fit
from lineage.explain.evidence import Evidence, median
from lineage.explain.thresholds import THROUGH
from lineage.fit import Forms


def through(ev: Evidence, a: str, b: str) -> float | None:
    """How far along the way from b to a the suspect went: the median over matrices of the
    projection of (suspect - b) on (a - b), 1 for a descendant of a, about the delta
    correlation for a sibling of a that shares b."""
    ts = []
    for r in ev.matrices:
        if a not in r.order or b not in r.order:
            continue
        f = Forms(r.stats)  # type: ignore[arg-type]
        ab = f.diff(a, b)
        den = f.dot(ab, ab)
        if den > 0:
            ts.append(f.dot(f.diff("suspect", b), ab) / den)
    return median(ts)


def opening(suspect: str, parent: str) -> str:
    """The first words of a derived verdict's explanation (explain/siblings.py rewrites them)."""
    return f"{suspect} derives from {parent} but is not a copy"


class Derived(Explanation):
    name = "derived"

    def explain(self, ev: Evidence) -> dict | None:
        related = ev.related
        if not related:
            return None
        if len(related) >= 2:
            blend_fit(ev)  # its evidence says why a blend was not claimed
        per = ev.per
        best = max(related, key=lambda n: (per[n].median_corr, -(per[n].median_rel_dist or 0)))  # type: ignore[arg-type, return-value]
        base, note = ev.declared, ""
        if base in related and base != best:
            t = through(ev, best, base)
            if t is not None and t < THROUGH:
                note = (
                    f" It is closer to {best}, but shares only {t:.2f} of {best}'s delta from the declared base {base} "
                    f"(a descendant of {best} shares about 1): a sibling of {best}, or a descendant of {base} along "
                    "a similar path."
                )
                best = base
        ev.analyses["derived"] = {"parent_by": "declared base" if base in related else "closest"}
        p = per[best]
        also = [n for n in related if n != best]
        return document(
            ev,
            "derived",
            one_parent(ev, best),
            f"{opening(ev.suspect, best)}: median correlation {p.median_corr:.4f} "
            f"(z {p.median_z:.0f} against the null of unrelated tensors, {p.frac_significant:.0%} of "
            f"matrices significant), median relative distance {p.median_rel_dist:.3g}, beyond storage rounding."
            + (
                f" {', '.join(also)} also correlate{'s' if len(also) == 1 else ''} (related to {best}), but a blend explains no more."
                if also
                else ""
            )
            + note,
        )
