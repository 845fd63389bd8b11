"""The blend over the related candidates: one fit that four explanations share.

Sparse merges, task arithmetic, slerp and linear interpolation are all
blends; they differ in how the suspect departs from the plain linear fit.
This fit (the affine weights of every related candidate, refitted on every
matrix and aggregated) decides whether the suspect is a blend at all, and
each of those explanations then reads it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from lineage.explain.aftermerge import after_merge
from lineage.explain.aftermerge import describe as describe_after
from lineage.explain.evidence import Evidence, median, weighted
from lineage.explain.schedule import describe, schedule
from lineage.explain.thresholds import (
    BLEND_GAIN,
    MAX_WITHIN_SD,
    MIN_WEIGHT,
    SPARSE_GAIN,
    SPARSE_NEAR,
    SPARSE_NO_BASE_GAIN,
    TRAINED_GAIN,
    TRAINED_MAX_BASE,
    TRAINED_MIN_WEIGHT,
)


@dataclass
class BlendFit:
    """The blend over the related candidates, aggregated over the suspect's matrices."""

    is_blend: bool
    weights: dict[str, dict]  # candidate -> weighted() of its per-tensor weights
    material: list[str]  # candidates whose share is material (>= MIN_WEIGHT, interval above 0)
    base: str | None
    evidence: dict
    schedules: dict[str, dict]  # candidate -> its schedule (schedule.py)
    trained: bool = False  # accepted as a merge trained (or sparsified) afterwards


def blend_fit(ev: Evidence) -> BlendFit:
    """The affine blend over the related candidates, refitted on every matrix (once per suspect)."""
    return ev.memo("blend_fit", lambda: _blend_fit(ev))


def _blend_fit(ev: Evidence) -> BlendFit:
    """The affine blend fit; where it explains nothing, the fit with free weights, when that
    one makes the suspect a plain blend whose weights sum clearly away from 1: a linear merge
    with its weights not normalised (mergekit's `normalize: false`, weights 0.6 and 0.6)."""
    fit = _fit(ev, free=False)
    if not fit.is_blend and len(ev.related) >= 2:
        alt = _fit(ev, free=True)
        e = alt.evidence
        total = sum(w["mean"] for w in alt.weights.values())
        plain = e["median_gain"] is not None and e["median_gain"] <= BLEND_GAIN and not (e["sparse"] or alt.trained)
        if alt.is_blend and plain and abs(total - 1) >= MIN_WEIGHT:
            e["weights_sum"] = total
            fit = alt
    ev.analyses["blend"] = fit.evidence
    return fit


def _fit(ev: Evidence, free: bool) -> BlendFit:
    """The blend fit, and whether it makes the suspect a blend.

    Sparse merges (TIES, DARE) take each element from one parent (a
    dropped delta leaves the base's value, a kept one the fine-tune's),
    so the suspect coincides with the base and with every parent on a
    large fraction of elements, where a dense blend coincides with none;
    their linear fit explains less (the drop pattern is noise to it), so
    they are accepted at a weaker gain."""
    use = ev.related
    base = ev.declared if ev.declared in use else None
    near = {n: ev.per[n].median_near_frac for n in use}
    per_w: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    points: dict[str, list] = defaultdict(list)
    gains, cosf = [], []
    bases: Counter = Counter()
    for r, b in ev.refits(use, base, free):
        if r.ndim < 2:
            continue
        bases[b.base] += 1
        singles = {c.candidate: c.rel_dist for c in r.cands if c.status == "ok"}
        best_single = min(singles[n] for n in use)
        if best_single > 0:
            gains.append(b.residual_rel / best_single)
        cosf.append(b.cos_fit)
        for n in use:
            per_w[n].append((b.weights[n], b.se[n], float(r.numel)))
            points[n].append((r.layer, r.component, b.weights[n], b.se[n], float(r.numel)))
    layers = 1 + max((r.layer for r in ev.rows if r.layer is not None), default=0)
    schedules = {n: schedule(points[n], layers) for n in use if points[n]}
    weights = {n: within(weighted(v), schedules[n]) for n, v in per_w.items() if v}
    gain = median(gains)
    material = [n for n, w in weights.items() if w["mean"] >= MIN_WEIGHT and w["ci95"][0] > 0]
    consistent = all((schedules[n]["within_sd"] or 0.0) <= MAX_WITHIN_SD for n in material)
    others = [n for n in use if n not in material]
    fitted_base = base or (bases.most_common(1)[0][0] if bases else None)
    sparse = bool(material) and bool(others) and all((near.get(n) or 0.0) >= SPARSE_NEAR for n in material + others[:1])
    # A sparse merge that does not renormalise what it keeps (breadcrumbs; della's per-element
    # rescale) coincides with its base where every delta was dropped, but with no parent: the
    # base then carries a share of the affine fit. A dense blend coincides with no candidate.
    # SCE (select, calculate, erase) keeps the same elements of every parent's delta, those where
    # the parents differ most, and drops the rest for all of them: the suspect coincides with the
    # base there and, where the kept deltas' signs disagreed, with the one parent whose delta was
    # kept and renormalised (with more parents, fewer such elements: the parents' coincidence is
    # then not required). The elements it drops carry the parents' shared delta, so the base
    # keeps a material, positive share of the affine fit (TIES and DARE leave it none), and the
    # erased elements leave the fit most of the residual (a dense blend with the base among its
    # parents, model_stock's, fits within rounding: it is not taken for SCE).
    unnormalised = shared_mask = None
    if not sparse and material:
        top = max(use, key=lambda n: near.get(n) or 0.0)
        kept = [n for n in material if n != top]
        if (near.get(top) or 0.0) >= SPARSE_NEAR and len(kept) >= 2:
            if all((near.get(n) or 0.0) < SPARSE_NEAR for n in kept):
                unnormalised = top
            elif top in material and gain is not None and gain > BLEND_GAIN:
                shared_mask = top
            sparse = bool(unnormalised or shared_mask)
    # With no base among the candidates (its two parents only), a sparse merge whose kept deltas land
    # on their parents' values (TIES' renormalisation, DARE at weight = density) still coincides with
    # each parent on a material share of elements, which no dense blend and no sibling fine-tune does.
    no_base = (
        not sparse
        and len(use) == len(material) == 2
        and all((near.get(n) or 0.0) >= SPARSE_NEAR for n in material)
        and gain is not None
        and gain <= SPARSE_NO_BASE_GAIN
    )
    sparse = sparse or no_base
    # A merge of two or more models that derive from a base in the pool, trained (or sparsified)
    # afterwards: each carries a large share, and together they carry the whole delta from the
    # base, which keeps no weight (a merge takes its parents' deltas whole; a sibling's delta only
    # correlates with theirs, so its fit shrinks toward the base: base weight (1 - rho) /
    # (1 + (k - 1) rho) for k siblings at rho). Without the base in the pool the two cannot be told.
    heavy = [n for n in material if weights[n]["ci95"][0] >= TRAINED_MIN_WEIGHT]
    rest = [weights[n]["mean"] for n in use if n not in heavy]
    trained = (
        gain is not None
        and BLEND_GAIN < gain <= TRAINED_GAIN
        and len(heavy) >= 2
        and bool(rest)
        and max(rest) <= TRAINED_MAX_BASE
    )
    explains = gain is not None and (gain <= BLEND_GAIN or (sparse and gain <= SPARSE_GAIN) or trained)
    e = {
        "candidates": use,
        "matrices": len(cosf),
        "median_gain": gain,
        "median_cos_fit": median(cosf),
        "weights": weights,
        "within_sd": {n: schedules[n]["within_sd"] for n in schedules},
        "sparse": sparse,
        "sparse_no_base": no_base,
        "sparse_unnormalised_base": unnormalised,
        "sparse_shared_mask_base": shared_mask,
        "trained_after": trained,
        "median_near_frac": near,
        "criteria": {
            "gain_max": BLEND_GAIN,
            "gain_max_sparse": SPARSE_GAIN,
            "gain_max_sparse_no_base": SPARSE_NO_BASE_GAIN,
            "gain_max_trained": TRAINED_GAIN,
            "trained_min_weight": TRAINED_MIN_WEIGHT,
            "trained_max_base_weight": TRAINED_MAX_BASE,
            "sparse_near_frac_min": SPARSE_NEAR,
            "min_weight": MIN_WEIGHT,
            "max_within_sd": MAX_WITHIN_SD,
        },
    }
    return BlendFit(
        is_blend=len(material) >= 2 and consistent and explains,
        weights=weights,
        material=material,
        base=fitted_base,
        evidence=e,
        schedules=schedules,
        trained=trained and not (gain is not None and (gain <= BLEND_GAIN or (sparse and gain <= SPARSE_GAIN))),
    )


def within(w: dict, s: dict) -> dict:
    """A parent's weight summary whose interval counts the spread within groups, not the schedule.

    `weighted` puts the whole spread across tensors into the interval; for a
    scheduled merge most of it is the schedule (known, reported), so the
    interval uses the spread within the groups one setting covers."""
    if s.get("within_sd") is None or s.get("kind") == "constant" or w["sd"] <= s["within_sd"]:
        return w
    half = (w["ci95"][1] - w["ci95"][0]) / 2
    scaled = half * s["within_sd"] / w["sd"] if w["sd"] > 0 else half
    return {**w, "ci95": [w["mean"] - scaled, w["mean"] + scaled], "schedule_sd": w["sd"], "sd": s["within_sd"]}


def blend_parents(ev: Evidence, names: list[str] | None = None) -> list[dict]:
    """The blend's material parents (or `names`), heaviest first, with weights and intervals."""
    fit = blend_fit(ev)
    # the base of a sparse merge that keeps a share of the fit (breadcrumbs, DELLA, SCE) is no parent
    skip = fit.evidence.get("sparse_unnormalised_base") or fit.evidence.get("sparse_shared_mask_base")
    if names is None:
        names = [m for m in fit.material if m != skip]
    return [parent_entry(ev, n) for n in sorted(names, key=lambda n: -fit.weights[n]["mean"])]


def parent_entry(ev: Evidence, n: str) -> dict:
    """One parent as the verdict lists it: its weight, interval, spread and tensor count."""
    fit = blend_fit(ev)
    w = fit.weights[n]
    p = {
        "name": n,
        "weight": round(w["mean"], 6),
        "ci95": [round(x, 6) for x in w["ci95"]],
        "sd_across_tensors": round(w.get("schedule_sd", w["sd"]), 6),
        "sd_within_groups": fit.schedules[n]["within_sd"] if n in fit.schedules else None,
        "tensors": w["tensors"],
    }
    if ev.aliases.get(n):
        p["aliases"] = ev.aliases[n]
    return p


def is_blend(ev: Evidence) -> bool:
    """Two or more related candidates whose blend makes the suspect a blend."""
    return len(ev.related) >= 2 and blend_fit(ev).is_blend


def intervals(parents: list[dict]) -> str:
    return ", ".join(f"{p['name']} [{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}]" for p in parents)


def tail(ev: Evidence) -> str:
    """The sentences on how well the blend fits and how its weights run, which several explanations end with."""
    fit = blend_fit(ev)
    e = fit.evidence
    text = (
        f" Fitted relative to a common base over {e['matrices']} matrices, the blend leaves "
        f"{e['median_gain']:.0%} of the best single parent's residual (median cos_fit {e['median_cos_fit']:.3f})"
    )
    if fit.trained:
        text += (
            f", more than an exact merge leaves but structured: {len(fit.material)} parents each carry a large, "
            "tight share, so the rest is what training after the merge (or a sparse merge's drop noise) added"
        )
    scheds = {n: fit.schedules[n] for n in fit.material if n in fit.schedules}
    if all(s["kind"] == "constant" for s in scheds.values()):
        text += "; the weights agree across tensors."
    else:
        text += "; the weights follow a schedule: " + "; ".join(describe(n, s) for n, s in scheds.items()) + "."
    return text + describe_after(after(ev))


def after(ev: Evidence) -> dict:
    """What happened after the merge (aftermerge.py), once per suspect."""
    fit = blend_fit(ev)
    use = fit.evidence["candidates"]
    return ev.memo("after_merge", lambda: after_merge(ev, use, ev.declared if ev.declared in use else None))


def extras(ev: Evidence) -> dict:
    """The blend's optional verdict fields: each parent's schedule, the residual it leaves, and
    what that residual says happened after the merge."""
    fit = blend_fit(ev)
    e = fit.evidence
    return {
        "after_merge": after(ev),
        "schedule": {n: fit.schedules[n] for n in fit.material if n in fit.schedules},
        "residual": {
            "of_best_single_parent": e["median_gain"],
            "cos_fit": e["median_cos_fit"],
            "trained_after": fit.trained,
        },
    }
