"""Sparsified merges, TIES and DARE, and how they are told apart.

A sparsified merge keeps only part of each parent's delta from the base
(TIES keeps the largest by magnitude, DARE a random part, rescaled), so the
suspect coincides within rounding with the base wherever every delta was
dropped, and with a parent where only its delta was kept: the blend fit
marks it `sparse` (blendfit.py). Which deltas were dropped tells the two
apart. The kernel measures, per parent, the energy of its delta over the
elements where the suspect kept the base's value (`Stats.dropped`); per
such element, against the parent's average delta energy per element:
DARE drops at random, so about 1; TIES drops the smallest, far below 1
(0.2 for a Gaussian delta at density 0.5); DELLA drops at random but the
small deltas more often, so a little below 1. SPARSE_FAMILY holds the cuts.
SCE drops the same elements of every parent (where their deltas agree
most), which leaves the base a positive share of the fit (blendfit.py).
"""

from __future__ import annotations

from collections import defaultdict

from lineage.explain.base import Explanation, document
from lineage.explain.blendfit import blend_fit, blend_parents, extras, intervals, is_blend
from lineage.explain.evidence import Evidence
from lineage.explain.thresholds import SPARSE_FAMILY

HOW = {
    "breadcrumbs": "the deltas it dropped are the small ones, and what it kept was not renormalised (breadcrumbs)",
    "della": ("the deltas it dropped are a little smaller than typical (DELLA drops at random, the smaller deltas more often)"),
    "breadcrumbs/della": "whether the dropped deltas were the small ones (breadcrumbs) or drawn by magnitude (DELLA) is not clear",
    "ties": "the deltas it dropped are the small ones (TIES trims by magnitude)",
    "dare": "the deltas it dropped are of typical size (DARE drops at random and rescales the rest)",
    "ties/dare": "whether the dropped deltas were the small ones (TIES) or random ones (DARE) is not clear",
    "sce": (
        "it dropped the same elements of every parent's delta, where they agree, and kept the base's share of "
        "their common delta there (SCE selects the elements where the parents differ most)"
    ),
}


def family(ev: Evidence, base: str, parents: list[str]) -> tuple[str, dict[str, float]]:
    """TIES, DARE, DELLA or undecided, and each parent's dropped-energy ratio, pooled over the
    matrices whose stored statistics have `base` as their reference column."""
    num: dict[str, float] = defaultdict(float)
    den: dict[str, float] = defaultdict(float)
    for r in ev.matrices:
        if not r.order or r.order[0] != base:
            continue
        st = r.stats
        if st is None or not st.near[0] or not st.dropped:
            continue
        for n in parents:
            if n in st.order:
                j = st.order.index(n)
                num[n] += st.dropped[j] / st.near[0]
                den[n] += float(st.gram[j, j]) / st.n
    ratios = {n: num[n] / den[n] for n in parents if den.get(n)}
    if len(ratios) < len(parents):
        return "ties/dare", ratios
    if max(ratios.values()) <= SPARSE_FAMILY["ties_max"]:
        return "ties", ratios
    if min(ratios.values()) >= SPARSE_FAMILY["dare_min"]:
        return ("della" if max(ratios.values()) < SPARSE_FAMILY["della_max"] else "dare"), ratios
    return "ties/dare", ratios


def recipe_weights(ev: Evidence, base: str, parents: list[dict], ratios: dict[str, float], fam: str) -> dict[str, float]:
    """A sparse merge's weights as its recipe sets them, from the linear projection c_i.

    Without renormalisation a kept delta enters as w d, a dropped one not at all, so the
    projection is w times the share of the delta's energy kept: c = w (1 - r (1 - p)), r the
    dropped-energy ratio and p the density, from the base's coincidence (1 - p)^k for k parents.
    DELLA's weights are not recovered (its elected signs renormalise what it keeps): none."""
    near = ev.per[base].median_near_frac or 0.0
    k = max(len(parents), 1)
    density = 1 - near ** (1 / k)
    out = {}
    for p in parents:
        if fam != "breadcrumbs":  # DELLA's elected signs renormalise: its projection is not readable as weights
            return {}
        kept = 1 - ratios.get(p["name"], 0.0) * (1 - density)
        out[p["name"]] = round(p["weight"] / max(kept, 1e-6), 4)
    return out


class Sparse(Explanation):
    name = "sparse"

    def explain(self, ev: Evidence, confirmed: bool = False) -> dict | None:
        """The sparse blend's verdict; `confirmed`: whether or not the linear fit makes it one (the
        kept deltas, read element by element, have: explain/consensus.py)."""
        if not confirmed and (not is_blend(ev) or not blend_fit(ev).evidence["sparse"]):
            return None
        fit, parents = blend_fit(ev), blend_parents(ev)
        e = fit.evidence
        if e.get("sparse_no_base") and not confirmed:
            return without_base(ev, parents)
        rest = [n for n in ev.related if n not in fit.material]
        unnormalised = e.get("sparse_unnormalised_base")
        shared = e.get("sparse_shared_mask_base")
        b = unnormalised or shared or (ev.declared if ev.declared in rest else (rest[0] if len(rest) == 1 else fit.base))
        if confirmed:  # the base the kept deltas were read against, whatever share the linear fit gave it
            b = ev.declared if ev.declared in ev.related else b
            parents = [p for p in parents if p["name"] != b]
            if b is None or len(parents) < 2:
                return None
        assert b is not None
        desc = " + ".join(f"{p['weight']:.3f} x {p['name']}" for p in parents)
        fam, ratios = family(ev, b, [p["name"] for p in parents])
        ev.analyses["sparse"] = {
            "dropped_energy_ratio": ratios,
            "family": fam,
            "dropped_family": fam,  # by the dropped energy alone (explain/consensus.py may return to it)
            "criteria": SPARSE_FAMILY,
        }
        # kept deltas that land exactly on a parent's value were rescaled back to full size (DARE's
        # 1 / density, TIES's and DARE's renormalisation by the weights kept); breadcrumbs keeps them as
        # weighted, DELLA rescales element by element: neither lands on a parent
        ev.analyses["sparse"]["rescaled_to_parent"] = not unnormalised
        if shared or (unnormalised and fam != "ties" and b in fit.material):
            # the base keeps a positive share of the fit, and the dropped deltas are not the small ones:
            # SCE's one mask over the elements where the parents agree (their delta energy there runs
            # from half the average, for independent deltas, to nearly all of it for correlated ones;
            # DELLA's rescaled deltas leave the base a negative share, breadcrumbs drops the small ones)
            fam = ev.analyses["sparse"]["family"] = "sce"
        elif unnormalised:
            # kept deltas not landing on the parents: breadcrumbs (TIES' trim without renormalising), or
            # a DARE or DELLA merge whose weights differ from what its rescale undoes
            fam = {"ties": "breadcrumbs", "dare": "dare", "della": "della"}.get(fam, "breadcrumbs/della")
            ev.analyses["sparse"]["family"] = fam
            ev.analyses["sparse"]["recipe_weights"] = recipe_weights(ev, b, parents, ratios, fam)
        energy = (
            " (where it kept the base's value, the parents' deltas carry "
            + ", ".join(f"{n} {r:.2f}" for n, r in ratios.items())
            + " of their average energy per element)"
            if ratios
            else f" (not measured: {b} is not the reference column of the stored statistics)"
        )
        return document(
            ev,
            "blend",
            parents,
            f"{ev.suspect} is a sparsified merge ({fam.upper()} family) of {', '.join(p['name'] for p in parents)} on base {b}: "
            f"it coincides with each of them, within storage rounding, on "
            + ", ".join(f"{n} {e['median_near_frac'][n]:.0%}" for n in [b, *[p["name"] for p in parents]])
            + f" of elements, as dropped and kept deltas leave it; {HOW[fam]}{energy}. Its linear fit, {desc} (95% "
            f"intervals {intervals(parents)}), leaves {e['median_gain']:.0%} of the best single parent's residual; the weights "
            "agree across tensors but are the linear projection of the merge, not its recipe.",
            method="unknown",
            merge_family=fam,
            base=b,
            **extras(ev),
        )


def without_base(ev: Evidence, parents: list[dict]) -> dict:
    """A sparse merge whose base is not among the candidates: named a blend, its family and recipe
    left open (both need the base's values)."""
    e = blend_fit(ev).evidence
    ev.analyses["sparse"] = {"family": "ties/dare", "base": None, "criteria": SPARSE_FAMILY}
    desc = " + ".join(f"{p['weight']:.3f} x {p['name']}" for p in parents)
    return document(
        ev,
        "blend",
        parents,
        f"{ev.suspect} is a sparsified merge of {', '.join(p['name'] for p in parents)} on a base that is not among the "
        "candidates: it coincides with each of them, within storage rounding, on "
        + ", ".join(f"{p['name']} {e['median_near_frac'][p['name']]:.0%}" for p in parents)
        + " of elements, as a sparse merge leaves it where only that parent's delta was kept and brought back to full "
        f"size (TIES' renormalisation, DARE at a weight equal to its density); no dense blend and no sibling fine-tune "
        f"coincides with its parents so. Its linear fit, {desc} (95% intervals {intervals(parents)}), leaves "
        f"{e['median_gain']:.0%} of the best single parent's residual, the drop pattern's noise. Add the base to the "
        "candidates to name the method, its density and its recipe.",
        method="unknown",
        merge_family="ties/dare",
        base=None,
        **extras(ev),
    )
