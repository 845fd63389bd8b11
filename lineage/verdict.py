"""One verdict per suspect from its tensor rows: what the words mean, in code.

- `identical`: every compared tensor is within storage rounding of one
  candidate (`dtypes.rounding_tolerance`: a small fraction of an ULP for the
  same dtype, the coarser dtype's roundoff across dtypes), over at least
  90% of the suspect's float elements.
- related: a candidate is related when at least half of the suspect's
  matrices (ndim >= 2) correlate with it at z >= 6, where z is the
  covariance in standard deviations of its permutation null (the
  candidate's rows and columns shuffled: an unrelated matrix with the same
  row and column structure; fit.py). 1-D tensors (norms, biases) never
  decide: the norms of unrelated models sit near 1 and correlate by
  construction.
- `blend`: at least two related candidates (aliases collapsed) whose affine
  weights are each >= 0.05 with a 95% interval above 0, consistent across
  tensors (weighted SD <= 0.15), and the blend's residual is at most 0.7 of
  the best single parent's (median over matrices); at most 0.9 for a
  sparsified merge (TIES/DARE), recognised because the suspect coincides,
  within storage rounding, with the base and with each parent on >= 15% of
  elements (reported as `method: unknown`). The family is told by the
  parents' delta energy where the suspect kept the base's value, per
  element, against its average: TIES trims the smallest deltas (ratio
  <= 0.5: `merge_family: ties`), DARE drops at random (>= 0.75: `dare`);
  in between, or when the base is not the stored reference, `ties/dare`.
  Two fine-tunes of one base have correlated deltas, so their blend fits a
  little better than either; it does not fit 30% better, and the sibling's
  weight is small.
- A blend whose remaining candidate has a clearly negative weight is task
  arithmetic on that base (`method: task_arithmetic`, `base`).
- `derived`: otherwise, the closest related candidate (highest median
  correlation).
- `unrelated`: no candidate related and no more than 5% of matrices
  significant for any, with at least half of the suspect compared.
- `inconclusive`: anything else, with the reason.

Weights are numel-weighted means of per-tensor affine weights; the interval
combines the spread across tensors with the per-tensor standard errors.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass

from lineage.dtypes import rounding_tolerance
from lineage.fit import Blend, Forms, blend, interpolation
from lineage.rows import stats_of

SCHEMA_VERSION = 1
Z_SIG = 6.0
RELATED_FRAC = 0.5
UNRELATED_FRAC = 0.05
IDENTICAL_COVERAGE = 0.9
MIN_COVERAGE = 0.5
BLEND_GAIN = 0.7
MIN_WEIGHT = 0.05
MAX_SPREAD = 0.15
SPARSE_NEAR = 0.15  # median fraction of elements within rounding of a parent
SPARSE_GAIN = 0.9
#: dropped-delta energy ratio (see _sparse_family): TIES below, DARE above
SPARSE_FAMILY = {"ties_max": 0.5, "dare_min": 0.75}
NULL = (
    "permutation null: the covariance of suspect and candidate when the candidate's rows and columns are shuffled "
    "(an unrelated matrix with the same row and column structure), mean 0, sd in closed form from row and column "
    "sums; z = covariance / sd (1/sqrt(n) of correlation without structure)"
)


@dataclass(frozen=True)
class Candidate:
    name: str
    base: bool = False


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else None


def _weighted(values: list[tuple[float, float, float]]) -> dict:
    """(value, se, weight) triples -> mean, sd across tensors, 95% interval."""
    W = sum(w for _, _, w in values)
    mean = sum(v * w for v, _, w in values) / W
    var = sum(w * (v - mean) ** 2 for v, _, w in values) / W
    t_eff = W * W / sum(w * w for _, _, w in values)
    se_pooled2 = sum((w * (se or 0.0)) ** 2 for _, se, w in values) / (W * W)
    half = 1.96 * math.sqrt(var / t_eff + se_pooled2)
    return {"mean": mean, "sd": math.sqrt(var), "ci95": [mean - half, mean + half], "tensors": len(values)}


def _cand_entries(rows: list[dict]) -> dict[str, list[tuple[dict, dict]]]:
    out: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for r in rows:
        if r["status"] != "ok":
            continue
        for c in r["candidates"]:
            if c["status"] == "ok":
                out[c["candidate"]].append((r, c))
    return out


def _aliases(rows: list[dict], names: list[str], declared_base: str | None) -> dict[str, str]:
    """Map each candidate to the representative of its group of identical candidates."""
    rep = {n: n for n in names}

    def find(x: str) -> str:
        while rep[x] != x:
            x = rep[x]
        return x

    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = same = 0
            for r in rows:
                if r["status"] != "ok" or a not in r["stats_order"] or b not in r["stats_order"]:
                    continue
                dt = {c["candidate"]: c["dtype"] for c in r["candidates"]}
                st = stats_of(r)
                f = Forms(st)
                d = f.diff(a, b)
                pa_ = f.vec(a)
                rel = math.sqrt(max(f.dot(d, d), 0.0) / max(f.dot(pa_, pa_), 1e-300))
                tol = rounding_tolerance(dt[a], dt[b]) if "mixed" not in (dt[a], dt[b]) else 0.0
                shared += 1
                same += rel <= tol
            if shared and same == shared:
                ra, rb = find(a), find(b)
                keep = min((ra, rb), key=lambda n: (n != declared_base, names.index(n)))
                rep[ra if keep == rb else rb] = keep
    return {n: find(n) for n in names}


def decide(suspect: str, rows: list[dict], candidates: list[Candidate], unmatched: dict[str, int] | None = None) -> dict:
    """The verdict document for one suspect (see module docstring)."""
    names = [c.name for c in candidates]
    declared = next((c.name for c in candidates if c.base), None)
    ok = [r for r in rows if r["status"] == "ok"]
    float_rows = [r for r in rows if not (r["status"] == "skipped" and r["reason"].endswith("is not a weight"))]
    float_elems = sum(r["numel"] for r in float_rows) or 1
    skipped = Counter(f"{r['status']}: {_short(r['reason'])}" for r in rows if r["status"] != "ok")
    coverage = {
        "tensors": len(rows),
        "tensors_compared": len(ok),
        "bytes_compared": sum(r["bytes_read"] for r in ok),
        "elements_compared_frac": round(sum(r["numel"] for r in ok) / float_elems, 6),
        "skipped": dict(skipped),
        "candidate_tensors_unmatched": dict(unmatched or {}),
    }
    entries = _cand_entries(rows)
    per: dict[str, dict] = {}
    for n in names:
        es = entries.get(n, [])
        mats = [(r, c) for r, c in es if r["ndim"] >= 2]
        zs = [c["z"] for _, c in mats if c["z"] is not None]
        within = [
            c["rel_dist"] is not None and c["rel_dist"] <= c["rounding_tol"] for _, c in es if c["rounding_tol"] is not None
        ]
        cov = sum(r["numel"] for r, _ in es) / float_elems
        per[n] = {
            "tensors": len(es),
            "matrices": len(mats),
            "coverage": round(cov, 6),
            "median_corr": _median([c["corr"] for _, c in mats]),
            "median_rel_dist": _median([c["rel_dist"] for _, c in es]),
            "median_near_frac": _median([c.get("near_frac") for _, c in mats]),
            "median_z": _median(zs),
            "frac_significant": (sum(z >= Z_SIG for z in zs) / len(zs)) if zs else 0.0,
            "stouffer_z": (sum(zs) / math.sqrt(len(zs))) if zs else None,
            "identical": bool(es) and all(within) and len(within) == len(es) and cov >= IDENTICAL_COVERAGE,
        }
    alias_of = _aliases(rows, names, declared)
    groups: dict[str, list[str]] = defaultdict(list)
    for n in names:
        if alias_of[n] != n:
            groups[alias_of[n]].append(n)
    reps = [n for n in names if alias_of[n] == n]
    evidence = {
        "null": NULL,
        "z_threshold": Z_SIG,
        "candidates": {n: {k: v for k, v in per[n].items() if k != "identical"} for n in names},
    }
    closest = max(names, key=lambda n: per[n]["median_corr"] if per[n]["median_corr"] is not None else -2.0)

    def doc(verdict: str, parents: list[dict], explanation: str, **extra) -> dict:
        comps, layers = _components(rows, parents, names, declared if declared in reps else None)
        d = {
            "schema_version": SCHEMA_VERSION,
            "suspect": suspect,
            "verdict": verdict,
            "parents": parents,
            "closest": closest,
            "coverage": coverage,
            "components": comps,
            "evidence": evidence,
            "explanation": explanation,
        }
        if layers:
            d["layers"] = layers
        if groups:
            d["aliases"] = {k: v for k, v in groups.items()}
        d.update(extra)
        return d

    def one(name: str) -> list[dict]:
        p = {"name": name, "weight": 1.0, "ci95": [1.0, 1.0]}
        if groups.get(name):
            p["aliases"] = groups[name]
        return [p]

    if not ok:
        return doc("inconclusive", [], f"No tensor of {suspect} could be compared with any candidate ({_top(skipped)}).")

    ident = [n for n in reps if per[n]["identical"]]
    if ident:
        best = min(ident, key=lambda n: per[n]["median_rel_dist"])
        p = per[best]
        return doc(
            "identical",
            one(best),
            f"{suspect} equals {best} up to storage rounding: all {p['tensors']} compared tensors "
            f"({p['coverage']:.0%} of its elements) lie within the rounding of their dtypes "
            f"(median relative distance {p['median_rel_dist']:.2e}).",
        )

    stack = _passthrough(ok, reps)
    if stack is not None:
        parents = [{"name": n, "weight": round(w, 6), "ci95": [round(w, 6), round(w, 6)]} for n, w in stack["shares"].items()]
        layers = ", ".join(f"{layer}: {src}" for layer, src in stack["layers"].items())
        return doc(
            "blend",
            parents,
            f"{suspect} is a layer stack (passthrough merge): each of its {stack['matrices']} matrices is a copy, within "
            f"storage rounding, of one candidate's, taken from {' and '.join(stack['shares'])} (layers {layers}); "
            "weights are the share of elements each supplies.",
            method="passthrough",
            layer_sources=stack["layers"],
        )

    related = [n for n in reps if per[n]["matrices"] and per[n]["frac_significant"] >= RELATED_FRAC]
    if not related:
        partial = [n for n in reps if per[n]["frac_significant"] > UNRELATED_FRAC]
        if partial or coverage["elements_compared_frac"] < MIN_COVERAGE or not any(per[n]["matrices"] for n in reps):
            why = (
                f"{', '.join(partial)} correlate significantly on only part of the matrices"
                if partial
                else f"only {coverage['elements_compared_frac']:.0%} of its elements could be compared"
            )
            return doc("inconclusive", [], f"Neither related nor clearly unrelated: {why}.")
        zmax = max((abs(per[n]["median_z"] or 0.0) for n in reps), default=0.0)
        return doc(
            "unrelated",
            [],
            f"{suspect} is unrelated to every candidate: median |z| at most {zmax:.1f} against the null of "
            f"unrelated tensors (threshold {Z_SIG:g}), over {coverage['tensors_compared']} compared tensors.",
        )

    if len(related) >= 2:
        fit = _blend_fit(
            rows, related, declared if declared in related else None, {n: per[n]["median_near_frac"] for n in related}
        )
        evidence["blend"] = fit["evidence"]
        if fit["is_blend"]:
            parents = []
            for n in sorted(fit["material"], key=lambda n: -fit["weights"][n]["mean"]):
                w = fit["weights"][n]
                p = {
                    "name": n,
                    "weight": round(w["mean"], 6),
                    "ci95": [round(x, 6) for x in w["ci95"]],
                    "sd_across_tensors": round(w["sd"], 6),
                    "tensors": w["tensors"],
                }
                if groups.get(n):
                    p["aliases"] = groups[n]
                parents.append(p)
            ev = fit["evidence"]
            # A candidate with a clearly negative weight is the base of a task
            # arithmetic merge: s = b + sum l_i (p_i - b), so w_b = 1 - sum l_i < 0.
            negative = [n for n, w in fit["weights"].items() if w["mean"] <= -MIN_WEIGHT and w["ci95"][1] < 0]
            intervals = ", ".join(f"{p['name']} [{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}]" for p in parents)
            tail = (
                f" Fitted relative to a common base over {ev['matrices']} matrices, the blend leaves "
                f"{ev['median_gain']:.0%} of the best single parent's residual (median cos_fit "
                f"{ev['median_cos_fit']:.3f}), and the weights agree across tensors."
            )
            if ev["sparse"]:
                rest = [n for n in related if n not in fit["material"]]
                b = declared if declared in rest else (rest[0] if len(rest) == 1 else fit["base"])
                desc = " + ".join(f"{p['weight']:.3f} x {p['name']}" for p in parents)
                family, ratios = _sparse_family(rows, b, [p["name"] for p in parents])
                evidence["sparse"] = {"dropped_energy_ratio": ratios, "family": family, "criteria": SPARSE_FAMILY}
                how = {
                    "ties": "the deltas it dropped are the small ones (TIES trims by magnitude)",
                    "dare": "the deltas it dropped are of typical size (DARE drops at random and rescales the rest)",
                    "ties/dare": "whether the dropped deltas were the small ones (TIES) or random ones (DARE) is not clear",
                }[family]
                energy = (
                    " (where it kept the base's value, the parents' deltas carry "
                    + ", ".join(f"{n} {r:.2f}" for n, r in ratios.items())
                    + " of their average energy per element)"
                    if ratios
                    else f" (not measured: {b} is not the reference column of the stored statistics)"
                )
                return doc(
                    "blend",
                    parents,
                    f"{suspect} is a sparsified merge ({family.upper()} family) of {', '.join(p['name'] for p in parents)} on base {b}: "
                    f"it coincides with each of them, within storage rounding, on "
                    + ", ".join(f"{n} {fit['evidence']['median_near_frac'][n]:.0%}" for n in [b, *[p["name"] for p in parents]])
                    + f" of elements, as dropped and kept deltas leave it; {how}{energy}. Its linear fit, {desc} (95% "
                    f"intervals {intervals}), leaves {ev['median_gain']:.0%} of the best single parent's residual; the weights "
                    "agree across tensors but are the linear projection of the merge, not its recipe.",
                    method="unknown",
                    merge_family=family,
                    base=b,
                )
            if len(negative) == 1:
                b = negative[0]
                desc = f"{b} + " + " + ".join(f"{p['weight']:.3f} x ({p['name']} - {b})" for p in parents)
                return doc(
                    "blend",
                    parents,
                    f"{suspect} is a task-arithmetic merge on base {b}: {desc} (95% intervals {intervals}; "
                    f"{b}'s own weight is {fit['weights'][b]['mean']:.3f})." + tail,
                    method="task_arithmetic",
                    base=b,
                )
            if len(parents) == 2:
                a, b = parents[0]["name"], parents[1]["name"]
                interp = _interpolation(rows, a, b)
                if interp is not None:
                    evidence["interpolation"] = interp
                    if interp["is_slerp"]:
                        t = interp["t"]
                        slerp_parents = [
                            {**parents[0], "weight": round(1 - t["mean"], 6), "ci95": [round(1 - x, 6) for x in t["ci95"][::-1]]},
                            {**parents[1], "weight": round(t["mean"], 6), "ci95": [round(x, 6) for x in t["ci95"]]},
                        ]
                        for p in slerp_parents:
                            p.pop("sd_across_tensors", None)
                        return doc(
                            "blend",
                            slerp_parents,
                            f"{suspect} is a spherical interpolation (slerp) from {a} toward {b} at t = {t['mean']:.3f} "
                            f"(95% interval [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]): the parents are "
                            f"{interp['median_theta_deg']:.0f} degrees apart, and its free coefficients on them sum to "
                            f"1 + {interp['median_excess']:.4f} (z {interp['z']:.0f} against 1), the "
                            f"{interp['median_predicted_excess']:.4f} a slerp at that t and angle has, where a linear blend "
                            "sums to exactly 1. The weights are 1 - t and t.",
                            method="slerp",
                            t=round(t["mean"], 6),
                            slerp={"from": a, "toward": b, "t": round(t["mean"], 6), "ci95": [round(x, 6) for x in t["ci95"]]},
                            base=a,
                        )
                    if interp["median_predicted_excess"] < 3 * interp["median_se"]:
                        tail += (
                            f" A slerp at t = {fit['weights'][b]['mean']:.3f} would be indistinguishable: the parents are "
                            f"{interp['median_theta_deg']:.1f} degrees apart, where it departs from linear interpolation "
                            f"by {interp['median_predicted_excess']:.1e} (mergekit itself interpolates linearly below 1.8 "
                            "degrees); its t is then the weight of " + b + "."
                        )
            desc = " + ".join(f"{p['weight']:.3f} x {p['name']}" for p in parents)
            return doc(
                "blend",
                parents,
                f"{suspect} is a linear blend: {desc} (95% intervals {intervals})." + tail,
                method="linear",
                base=fit["base"],
            )

    best = max(related, key=lambda n: (per[n]["median_corr"], -(per[n]["median_rel_dist"] or 0)))
    p = per[best]
    also = [n for n in related if n != best]
    return doc(
        "derived",
        one(best),
        f"{suspect} derives from {best} but is not a copy: median correlation {p['median_corr']:.4f} "
        f"(z {p['median_z']:.0f} against the null of unrelated tensors, {p['frac_significant']:.0%} of "
        f"matrices significant), median relative distance {p['median_rel_dist']:.3g}, beyond storage rounding."
        + (
            f" {', '.join(also)} also correlate{'s' if len(also) == 1 else ''} (related to {best}), but a blend explains no more."
            if also
            else ""
        ),
    )


def unreadable(suspect: str, error: str) -> dict:
    """The verdict of a suspect whose files could not be opened."""
    return {
        "schema_version": SCHEMA_VERSION,
        "suspect": suspect,
        "verdict": "inconclusive",
        "parents": [],
        "closest": None,
        "coverage": {"tensors": 0, "tensors_compared": 0, "bytes_compared": 0, "skipped": {}},
        "components": {},
        "error": error,
        "explanation": f"{suspect} could not be audited: {error}",
    }


def _passthrough(ok: list[dict], reps: list[str]) -> dict | None:
    """A stack of copied layers: every matrix within rounding of one candidate,
    at least two candidates supplying >= 10% of the elements each."""
    mats = [r for r in ok if r["ndim"] >= 2]
    source: dict[str, tuple[str, dict]] = {}
    for r in mats:
        within = [
            c
            for c in r["candidates"]
            if c["candidate"] in reps
            and c["status"] == "ok"
            and c["rounding_tol"] is not None
            and (c["rel_dist"] or 1.0) <= c["rounding_tol"]
        ]
        if within:
            source[r["tensor"]] = (min(within, key=lambda c: c["rel_dist"])["candidate"], r)
    if not mats or len(source) < len(mats):
        return None
    total = sum(r["numel"] for r in mats)
    shares: Counter = Counter()
    for name, r in source.values():
        shares[name] += r["numel"] / total
    if sum(1 for v in shares.values() if v >= 0.1) < 2:
        return None
    layers: dict[str, str] = {}
    for name, r in source.values():
        if r["layer"] is not None:
            layers.setdefault(str(r["layer"]), name)
    return {
        "shares": dict(shares.most_common()),
        "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0]))),
        "matrices": len(mats),
    }


def _short(reason: str) -> str:
    """A reason's category for counting: no file, tensor, or numbers."""
    if "]: " in reason:
        reason = reason.split("]: ", 1)[1]
    return re.sub(r"\b\d+\b", "N", reason.split(": ")[0])[:80]


def _top(c: Counter) -> str:
    return ", ".join(f"{k} x{v}" for k, v in c.most_common(3))


def _blend_fit(rows: list[dict], use: list[str], base: str | None, near: dict[str, float | None]) -> dict:
    """Refit the affine blend over `use` on every matrix; aggregate weights and gain.

    `near`: per candidate, the median fraction of elements the suspect holds
    within storage rounding of it. Sparse merges (TIES, DARE) take each
    element from one parent (a dropped delta leaves the base's value, a kept
    one the fine-tune's), so the suspect coincides with the base and with
    every parent on a large fraction of elements, where a dense blend
    coincides with none; their linear fit explains less (the drop pattern is
    noise to it), so they are accepted at a weaker gain.
    """
    per_w: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    gains, cosf = [], []
    bases: Counter = Counter()
    for r, b in _refits([r for r in rows if r["ndim"] >= 2], use, base):
        bases[b.base] += 1
        singles = {c["candidate"]: c["rel_dist"] for c in r["candidates"] if c["status"] == "ok"}
        best_single = min(singles[n] for n in use)
        if best_single > 0:
            gains.append(b.residual_rel / best_single)
        cosf.append(b.cos_fit)
        for n in use:
            per_w[n].append((b.weights[n], b.se[n], float(r["numel"])))
    weights = {n: _weighted(v) for n, v in per_w.items() if v}
    gain = _median(gains)
    material = [n for n, w in weights.items() if w["mean"] >= MIN_WEIGHT and w["ci95"][0] > 0]
    consistent = all(weights[n]["sd"] <= MAX_SPREAD for n in material)
    others = [n for n in use if n not in material]
    sparse = bool(material) and bool(others) and all((near.get(n) or 0.0) >= SPARSE_NEAR for n in material + others[:1])
    explains = gain is not None and (gain <= BLEND_GAIN or (sparse and gain <= SPARSE_GAIN))
    is_blend = len(material) >= 2 and consistent and explains
    ev = {
        "candidates": use,
        "matrices": len(cosf),
        "median_gain": gain,
        "median_cos_fit": _median(cosf),
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
    return {
        "is_blend": is_blend,
        "weights": weights,
        "material": material,
        "evidence": ev,
        "base": base or (bases.most_common(1)[0][0] if bases else None),
    }


def _sparse_family(rows: list[dict], base: str, parents: list[str]) -> tuple[str, dict[str, float]]:
    """TIES, DARE or undecided, from the energy of the parents' deltas where the suspect kept the base.

    Per parent: (its delta energy over the elements where the suspect is
    within rounding of the base, per such element) / (its delta energy per
    element overall), pooled over matrices whose stored statistics have the
    base as reference. DARE drops deltas at random: about 1. TIES trims the
    smallest: far below 1 (0.2 for a Gaussian delta at density 0.5).
    """
    num: dict[str, float] = defaultdict(float)
    den: dict[str, float] = defaultdict(float)
    for r in rows:
        if r["status"] != "ok" or r["ndim"] < 2 or not r["stats_order"] or r["stats_order"][0] != base:
            continue
        st = stats_of(r)
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
        return "dare", ratios
    return "ties/dare", ratios


def _interpolation(rows: list[dict], a: str, b: str) -> dict | None:
    """Linear or spherical interpolation between two parents (fit.interpolation per matrix).

    Slerp when the free coefficients sum to more than 1 significantly
    (Stouffer z >= Z_SIG), by what a slerp at the fitted t and the parents'
    angle predicts (median ratio within [0.5, 2]), and that prediction is
    far above the noise (>= 3 standard errors): parents a few degrees apart
    cannot be told apart, and are reported as linear with the same weights.
    """
    fits = []
    for r in rows:
        if r["status"] != "ok" or r["ndim"] < 2 or not {a, b} <= set(r["stats_order"]):
            continue
        it = interpolation(stats_of(r), a, b)
        if it is not None and it.se > 0:
            fits.append((it, float(r["numel"])))
    if not fits:
        return None
    z = sum(it.excess / it.se for it, _ in fits) / math.sqrt(len(fits))
    ratio = _median([it.excess / it.predicted for it, _ in fits if it.predicted > 0])
    pred, se = _median([it.predicted for it, _ in fits]), _median([it.se for it, _ in fits])
    t = _weighted([(it.t, it.se, w) for it, w in fits])
    is_slerp = z >= Z_SIG and ratio is not None and 0.5 <= ratio <= 2 and pred is not None and pred >= 3 * (se or 0)
    return {
        "is_slerp": is_slerp,
        "matrices": len(fits),
        "median_excess": _median([it.excess for it, _ in fits]),
        "median_se": se,
        "z": z,
        "median_predicted_excess": pred,
        "median_excess_over_predicted": ratio,
        "median_theta_deg": math.degrees(_median([it.theta for it, _ in fits]) or 0.0),
        "t": {k: t[k] for k in ("mean", "ci95", "sd")},
        "toward": b,
    }


def _refits(rows: list[dict], use: list[str], base: str | None) -> list[tuple[dict, Blend]]:
    """(row, blend over `use`) for every compared row that holds all of `use`."""
    out = []
    for r in rows:
        if r["status"] != "ok" or not set(use) <= set(r["stats_order"]):
            continue
        b = blend(stats_of(r), use=use, base=base)
        if b is not None and all(b.weights[n] is not None for n in use):
            out.append((r, b))
    return out


def _weights_of(fits: list[tuple[dict, Blend]], use: list[str]) -> dict:
    """Numel-weighted mean and spread of each candidate's weight over `fits`."""
    out = {}
    for n in use:
        vals = [(b.weights[n], b.se[n], float(r["numel"])) for r, b in fits]
        if vals:
            out[n] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in _weighted(vals).items() if k != "ci95"}
    return out


def _components(rows: list[dict], parents: list[dict], names: list[str], base: str | None) -> tuple[dict, dict]:
    """Per component: tensor counts, median correlation per candidate, blend
    weights; and per layer of the main stack, blend weights over its matrices."""
    use = [p["name"] for p in parents]
    fits = _refits(rows, use, base) if len(use) >= 2 else []
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["component"]].append(r)
    comps = {}
    for comp, rs in sorted(by.items()):
        ok = [r for r in rs if r["status"] == "ok"]
        d: dict = {"tensors": len(rs), "tensors_compared": len(ok)}
        corr = {}
        for n in names:
            cs = [c["corr"] for r in ok for c in r["candidates"] if c["candidate"] == n and c["status"] == "ok"]
            if cs:
                corr[n] = _median(cs)
        d["median_corr"] = corr
        if fits:
            d["weights"] = _weights_of([(r, b) for r, b in fits if r["component"] == comp], use)
        comps[comp] = d
    layers: dict[str, dict] = {}
    for layer in sorted({r["layer"] for r, _ in fits if r["layer"] is not None and r["ndim"] >= 2}):
        w = _weights_of([(r, b) for r, b in fits if r["layer"] == layer and r["ndim"] >= 2], use)
        layers[str(layer)] = {n: v["mean"] for n, v in w.items()}
    return comps, layers
