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

from lineage.explain.evidence import Evidence, median, weighted
from lineage.explain.thresholds import BLEND_GAIN, MAX_SPREAD, MIN_WEIGHT, SPARSE_GAIN, SPARSE_NEAR


@dataclass
class BlendFit:
    """The blend over the related candidates, aggregated over the suspect's matrices."""

    is_blend: bool
    weights: dict[str, dict]  # candidate -> weighted() of its per-tensor weights
    material: list[str]  # candidates whose share is material (>= MIN_WEIGHT, interval above 0)
    base: str | None
    evidence: dict


def blend_fit(ev: Evidence) -> BlendFit:
    """The affine blend over the related candidates, refitted on every matrix (once per suspect)."""
    return ev.memo("blend_fit", lambda: _blend_fit(ev))


def _blend_fit(ev: Evidence) -> BlendFit:
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
    gains, cosf = [], []
    bases: Counter = Counter()
    for r, b in ev.refits(use, base):
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
    weights = {n: weighted(v) for n, v in per_w.items() if v}
    gain = median(gains)
    material = [n for n, w in weights.items() if w["mean"] >= MIN_WEIGHT and w["ci95"][0] > 0]
    consistent = all(weights[n]["sd"] <= MAX_SPREAD for n in material)
    others = [n for n in use if n not in material]
    sparse = bool(material) and bool(others) and all((near.get(n) or 0.0) >= SPARSE_NEAR for n in material + others[:1])
    explains = gain is not None and (gain <= BLEND_GAIN or (sparse and gain <= SPARSE_GAIN))
    e = {
        "candidates": use,
        "matrices": len(cosf),
        "median_gain": gain,
        "median_cos_fit": median(cosf),
        "weights": weights,
        "sparse": sparse,
        "median_near_frac": near,
        "criteria": {
            "gain_max": BLEND_GAIN,
            "gain_max_sparse": SPARSE_GAIN,
            "sparse_near_frac_min": SPARSE_NEAR,
            "min_weight": MIN_WEIGHT,
            "max_sd_across_tensors": MAX_SPREAD,
        },
    }
    ev.analyses["blend"] = e
    return BlendFit(
        is_blend=len(material) >= 2 and consistent and explains,
        weights=weights,
        material=material,
        base=base or (bases.most_common(1)[0][0] if bases else None),
        evidence=e,
    )


def blend_parents(ev: Evidence) -> list[dict]:
    """The blend's material parents, heaviest first, with weights and intervals."""
    fit = blend_fit(ev)
    parents = []
    for n in sorted(fit.material, key=lambda n: -fit.weights[n]["mean"]):
        w = fit.weights[n]
        p = {
            "name": n,
            "weight": round(w["mean"], 6),
            "ci95": [round(x, 6) for x in w["ci95"]],
            "sd_across_tensors": round(w["sd"], 6),
            "tensors": w["tensors"],
        }
        if ev.aliases.get(n):
            p["aliases"] = ev.aliases[n]
        parents.append(p)
    return parents


def is_blend(ev: Evidence) -> bool:
    """Two or more related candidates whose blend makes the suspect a blend."""
    return len(ev.related) >= 2 and blend_fit(ev).is_blend


def intervals(parents: list[dict]) -> str:
    return ", ".join(f"{p['name']} [{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}]" for p in parents)


def tail(ev: Evidence) -> str:
    """The sentence on how well the blend fits, which several explanations end with."""
    e = blend_fit(ev).evidence
    return (
        f" Fitted relative to a common base over {e['matrices']} matrices, the blend leaves "
        f"{e['median_gain']:.0%} of the best single parent's residual (median cos_fit "
        f"{e['median_cos_fit']:.3f}), and the weights agree across tensors."
    )
