"""Refiner: what a sparse merge did with the deltas it kept.

The dropped-delta energy (explain/sparse.py) tells which deltas a sparse
merge dropped, not what it did with the ones it kept. For a sparse `blend`
(TIES, DARE, breadcrumbs or DELLA family) with its base and two or more
parents, this step reads a bounded sample of rows of up to
MAX_CONSENSUS_TENSORS matrices (lineage/consensus.py, as Ray work) and asks
what mergekit would need to be told.

By what factor was each parent's kept delta scaled? DARE scales it by its
weight over the density. Where a parent's delta is large against the
suspect's value, (s - b) / (p - b) is that factor wherever only this
parent's delta was kept: the mode of its histogram. The recipe's density is
then each parent's weight over its factor (0.50 for mergekit dare_ties at
0.6 / 0.4 and density 0.5, where the share of elements left at the base's
value says 0.47).

Signs elected? TIES' sign election (dare_ties) keeps, per element, only
the deltas whose sign agrees with their weighted sum's, which matters only
where the parents' deltas from the base disagree in sign. The suspect's
delta is fitted on the parents' twice, where their deltas conflict in sign
and where they agree. DARE's random mask does not look at signs, so
without election the two fits agree (their summed coefficients' ratio is
1); with it, where the deltas conflict the suspect follows the surviving
(larger) one at full weight, and the ratio rises (1.16 for mergekit
dare_ties at density 0.5). Where they agree, the fit gives the recipe's
weights, which the whole-tensor projection blurs when signs were elected.
Magnitude-based drops (TIES, breadcrumbs, DELLA) raise that ratio without
election, so it judges only DARE, and only with three or more parents.

With two parents, sharper tests decide (`evidence.sparse.kept_deltas`, see
lineage/consensus.py): an elected merge never adds two deltas of opposite
sign, a linear one does about as often as it adds agreeing ones, whatever
drops them (mergekit ties, dare_ties, breadcrumbs_ties, della: 0.000;
breadcrumbs 0.58, della_linear 0.88, dare_linear 0.97); where two agreeing
deltas were both kept, their coefficients sum to 1 when the merge divides by
the weights kept (TIES and DELLA's `normalize`: they are the weights' shares)
and to 2 when it adds them (then each kept delta's factor is its weight, for
merges that do not rescale); and a magnitude-based merge keeps each parent's
deltas in one band of magnitudes, whose share of the elements is the density
and the share above it breadcrumbs' gamma (0.499-0.503 and 0.010 for mergekit
breadcrumbs at density 0.5, gamma 0.01). None of these is read where the two
added deltas do not make the suspect's (training after the merge).

The results are `evidence.sparse.kept_scale`, `.sign_election` and
`.kept_deltas`, sentences in the explanation, and the recipe
(`evidence.sparse.recipe`): merge_method (ties, breadcrumbs,
breadcrumbs_ties, dare_ties, dare_linear, della, della_linear), `normalize`
where it differs from the method's default, the weights, the density and
gamma.
"""

from __future__ import annotations

import math

import numpy as np

from lineage.align import Index
from lineage.consensus import (
    MAX_CONSENSUS_ELEMENTS,
    MAX_CONSENSUS_TENSORS,
    SCALE_MIN_ELEMENTS,
    ConsensusItem,
    ConsensusPart,
    factor,
)
from lineage.explain.blendfit import blend_fit
from lineage.explain.evidence import Evidence
from lineage.explain.sparse import HOW, Sparse
from lineage.explain.thresholds import COMBINED, KEPT, SIGN_ELECTION
from lineage.geometry import View
from lineage.layout import canonical
from lineage.source import natural_key

#: The families this step reads (SCE's one shared mask leaves nothing to elect).
FAMILIES = ("dare", "della", "ties", "breadcrumbs", "breadcrumbs/della", "ties/dare", "sce")
#: mergekit's default `normalize` per method (generalized_task_arithmetic in its registry).
NORMALIZES = {"ties": True, "della": True}


def _fit(g: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Coefficients of the last column on the others from their Gram `g` over `n` elements,
    and their covariance (OLS); None when singular."""
    k = g.shape[0] - 1
    if n <= k + 1:
        return None
    try:
        inv = np.linalg.inv(g[:k, :k])
    except np.linalg.LinAlgError:
        return None
    beta = inv @ g[:k, k]
    rss = max(float(g[k, k] - beta @ g[:k, k]), 0.0)
    return beta, inv * rss / (n - k)


class KeptDeltas:
    name = "kept_deltas"
    refines = True

    @staticmethod
    def eligible(ev: Evidence, verdict: dict | None) -> tuple[str, list[str], dict | None] | None:
        """(base, parents, None) of a sparse blend this step can test; (base, parents, the sparse
        verdict) of a `derived` suspect whose blend fit looks sparse but leaves too much residual
        (DARE at a low density), or of a dense-looking two-parent blend (a high density), which the
        test may turn into that sparse blend; else None."""
        if verdict is None or verdict.get("undone") or verdict.get("layer_map") or verdict.get("permutation"):
            return None  # the deltas would be taken in another gauge or between other layers
        proposed = None
        if verdict["verdict"] == "blend" and verdict.get("merge_family") in FAMILIES:
            pass
        elif len(ev.related) < 3:  # a base and two parents, related, or no blend fit to read
            return None
        elif (verdict["verdict"] == "derived" and blend_fit(ev).evidence.get("sparse")) or (
            verdict["verdict"] == "blend"
            and verdict.get("method") in ("linear", "task_arithmetic", "unknown")
            and not verdict.get("merge_family")
        ):
            before = dict(ev.analyses)
            proposed = Sparse().explain(ev, confirmed=True)
            ev.analyses.clear()  # a proposal only: what it recorded stays out of the evidence unless confirmed
            ev.analyses.update(before)
            if proposed is None or len(proposed["parents"]) != 2:
                return None
            verdict = proposed
        else:
            return None
        base = verdict.get("base")
        parents = [p["name"] for p in verdict["parents"] if p["name"] != base]
        if not base or len(parents) < 2 or not ev.models or any(n not in ev.models for n in [ev.suspect, base, *parents]):
            return None
        return base, parents, proposed

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        got = self.eligible(ev, verdict)
        if got is None:
            return []
        base, parents, _ = got
        assert ev.models is not None
        s_ix = Index.build(ev.models[ev.suspect])
        b_ix, p_ix = Index.build(ev.models[base]), [Index.build(ev.models[n]) for n in parents]
        chosen = []
        for name in sorted(s_ix.by_name, key=natural_key):
            se = s_ix.by_name[name]
            others = [b_ix.by_name.get(canonical(name)), *[ix.by_name.get(canonical(name)) for ix in p_ix]]
            if len(se.shape) != 2 or se.shape[1] > MAX_CONSENSUS_ELEMENTS:  # a row is the least a sample reads
                continue
            if all(o is not None and o.shape == se.shape for o in others):
                chosen.append((name, se, others))
        if len(chosen) > MAX_CONSENSUS_TENSORS:  # evenly spaced over the model
            step = len(chosen) / MAX_CONSENSUS_TENSORS
            chosen = [chosen[int(i * step)] for i in range(MAX_CONSENSUS_TENSORS)]
        items = []
        for name, se, others in chosen:
            views = [View((ix.seg(e),)) for ix, e in zip([b_ix, *p_ix], others)]
            share = min(1.0, MAX_CONSENSUS_ELEMENTS / max(se.shape[0] * se.shape[1], 1))  # what the sample reads
            nbytes = int(share * (se.nbytes + sum(e.nbytes for e in others)))  # type: ignore[union-attr]
            items.append(ConsensusItem(len(items), name, View((s_ix.seg(se),)), views[0], tuple(views[1:]), nbytes))
        return items

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        got = self.eligible(ev, verdict)
        if got is None or not results:
            return None
        assert verdict is not None
        base, parents, proposed = got
        parts = [r for r in results if isinstance(r, ConsensusPart)]
        if not parts:
            return None
        kept = pooled(parts, parents)
        confirmed = ""
        if proposed is not None:  # the linear fit did not make it a sparse blend: only a clean read does
            confirmed = clean(kept, base, verdict)
            if not confirmed:
                return None
            verdict = proposed
        sparse = dict(verdict["evidence"].get("sparse") or {})
        scales = {n: scale_peak(sum(p.scales[j] for p in parts)) for j, n in enumerate(parents)}
        sparse["kept_scale"] = {n: v for n, v in scales.items() if v}
        fam = named = verdict["merge_family"]
        sparse["sign_election"], said = election(parts, base, parents)
        explanation = verdict["explanation"] + confirmed
        if fam == "sce":
            alone = not_shared(kept)
            if alone is None:  # SCE's one shared mask: nothing more to read
                return None
            # kept alone: each parent had its own mask, which SCE's one mask cannot leave (the base's
            # share of the fit was the weights summing below 1)
            fam = sparse.get("dropped_family") or "ties/dare"
            said = (
                f" Not SCE: where the parents' deltas agree, {alone:.1%} of the elements that kept one kept it alone, "
                "which SCE's one mask for every parent never does."
            )
        decides = kept is not None and (kept["elected"] is not None or fam != "dare")
        if decides or fam != "dare":  # the coefficient ratio judges only DARE, and the sharper test first
            sparse["sign_election"]["elected"] = kept["elected"] if kept is not None else None
            said = ""
        if kept is not None:
            sparse["kept_deltas"] = kept
            said += kept_sentence(kept, base, election=decides)
        agree = sparse["sign_election"].get("weights_where_signs_agree")
        if sparse["sign_election"].get("elected") and fam == "dare" and agree:
            sparse["recipe_weights"] = agree
        fam, sparse["recipe"], weights = recipe(fam, sparse, parents)
        if weights:
            sparse["recipe_weights"] = weights
        sparse["family"] = fam
        if fam == "dare" and sparse["kept_scale"]:
            said += (
                " Where only one parent's delta was kept, it was scaled by "
                + ", ".join(f"{v['scale']:.3f} ({n})" for n, v in sparse["kept_scale"].items())
                + ": DARE's weight over the density."
            )
        errors = [r for r in results if isinstance(r, str)]
        if errors:
            sparse["sign_election"]["errors"] = errors[:5]
        if fam != named:  # the family the kept deltas name, in the sentence that named the first
            explanation = explanation.replace(f"({named.upper()} family)", f"({fam.upper()} family)").replace(
                HOW[named], HOW[fam]
            )
        ev.analyses["sparse"] = sparse
        return {
            **verdict,
            "merge_family": fam,
            "evidence": {**verdict["evidence"], "sparse": sparse},
            "explanation": explanation + said,
        }


def scale_peak(hist: np.ndarray) -> dict | None:
    """The factor (s - b) / (p - b) takes most often, from its histogram (None: too few measured)."""
    peak = factor(hist, SCALE_MIN_ELEMENTS)
    return None if peak is None else {"scale": round(peak, 3), "elements": int(hist.sum())}


def election(parts: list[ConsensusPart], base: str, parents: list[str]) -> tuple[dict, str]:
    """`evidence.sparse.sign_election` and the sentence that reports it."""
    k = len(parents)
    gc, ga = np.zeros((k + 1, k + 1)), np.zeros((k + 1, k + 1))
    nc = na = 0
    for p in parts:
        gc, ga, nc, na = gc + p.conflict, ga + p.agree, nc + p.n_conflict, na + p.n_agree
    fc, fa = _fit(gc, nc), _fit(ga, na)
    out: dict = {"tensors": len(parts), "elements": nc + na, "conflict_elements": nc, "criteria": SIGN_ELECTION}
    if nc < SIGN_ELECTION["min_conflict"] or fc is None or fa is None or abs(float(fa[0].sum())) < 1e-12:
        out["elected"] = None
        return out, ""
    (bc, cc), (ba, ca) = fc, fa
    sc, sa = float(bc.sum()), float(ba.sum())
    ratio = sc / sa
    se = math.sqrt(float(cc.sum()) / sa**2 + float(ca.sum()) * sc**2 / sa**4)
    lo, hi = ratio - SIGN_ELECTION["se"] * se, ratio + SIGN_ELECTION["se"] * se
    elected = True if lo > SIGN_ELECTION["elected_min"] else False if hi < SIGN_ELECTION["linear_max"] else None
    out |= {
        "ratio": round(ratio, 4),
        "se": round(se, 5),
        "interval": [round(lo, 4), round(hi, 4)],
        "elected": elected,
        "weights_where_signs_agree": {n: round(float(b), 4) for n, b in zip(parents, ba)},
        "weights_where_signs_conflict": {n: round(float(b), 4) for n, b in zip(parents, bc)},
    }
    how = {
        True: "TIES-style sign election, as mergekit's dare_ties makes: where the deltas agree, the weights are "
        + ", ".join(f"{n} {w:.3f}" for n, w in out["weights_where_signs_agree"].items()),
        False: "no sign election: every kept delta was added, as mergekit's dare_linear does",
        None: "whether signs were elected (dare_ties) or not (dare_linear) is not clear",
    }[elected]
    said = (
        f" Where the parents' deltas from {base} disagree in sign ({nc / (nc + na):.0%} of {nc + na:,} sampled "
        f"elements of {len(parts)} matrices), the suspect follows them {ratio:.3f} times as strongly as where they "
        f"agree (interval {lo:.3f}-{hi:.3f}): {how}."
    )
    return out, said


def _poisson(x: float, n: float, lo: bool) -> float:
    """A share x / n moved by 3 Poisson standard errors of the count x (down or up)."""
    return max(x - 3 * math.sqrt(x), 0.0) / n if lo else (x + 3 * math.sqrt(x) + 3) / n


def snap(x: float, within: float = KEPT["snap"]) -> float:
    """A density (or epsilon) as people write it: the multiple of 0.05 within `within`, else 2 decimals."""
    m = round(x / 0.05) * 0.05
    return round(m, 2) if abs(x - m) <= within else round(x, 2)


def pooled(parts: list[ConsensusPart], parents: list[str]) -> dict | None:
    """The two-parent tests pooled over the tensors (`evidence.sparse.kept_deltas`): whether
    opposite deltas were ever added (`elected`), whether added ones were divided by the weights
    kept (`normalized`, with the coefficients), each parent's factor and band; None unless two
    parents were measured."""
    ks = [p.kept for p in parts if p.kept is not None]
    if len(parents) != 2 or not ks:
        return None
    counts = np.sum([k.counts for k in ks], axis=0)
    (cc, cn), (ac, an) = (int(x) for x in counts[0]), (int(x) for x in counts[1])
    out: dict = {
        "tensors": len(ks),
        "kept_where_conflict": cn,
        "added_where_conflict": cc,
        "kept_where_agree": an,
        "added_where_agree": ac,
        "factors": {n: round(float(np.median([k.factors[j] for k in ks])), 4) for j, n in enumerate(parents)},
        "criteria": COMBINED | KEPT,
        "elected": None,
        "normalized": None,
    }
    shares = np.sum([k.shares for k in ks], axis=0)
    if shares[3]:
        out["precise_elements"] = int(shares[3])
        out["zero_share"] = round(float(shares[0] / shares[3]), 4)
        out["alone_share"] = {n: round(float(shares[1 + j] / shares[3]), 4) for j, n in enumerate(parents)}
    if cn >= COMBINED["min_kept"] and ac >= COMBINED["min_combined"]:
        lo = _poisson(cc, cn, True) / _poisson(ac, an, False)
        hi = _poisson(cc, cn, False) / max(_poisson(ac, an, True), 1 / an)
        out["ratio"] = round((cc / cn) / (ac / an), 4)
        out["interval"] = [round(lo, 4), round(hi, 4)]
        out["elected"] = True if hi < COMBINED["elected_max"] else False if lo > COMBINED["linear_min"] else None
    coef = None
    if ac >= COMBINED["min_combined"]:
        g = np.sum([k.combined for k in ks], axis=0)
        try:
            coef = np.linalg.solve(g[:2, :2], g[:2, 2])
        except np.linalg.LinAlgError:
            coef = None
    if coef is not None:
        total = float(coef.sum())
        residual = max(float(g[2, 2] - coef @ g[:2, 2]), 0.0) / max(float(g[2, 2]), 1e-300)
        out["added_coefficients"] = {n: round(float(c), 4) for n, c in zip(parents, coef)}
        out["added_residual"] = round(residual, 6)
        w = KEPT["normalized_within"]
        out["normalized"] = True if abs(total - 1) < w else False if abs(total - 2) < 2 * w else None
    if coef is None or out["added_residual"] > KEPT["added_residual_max"]:
        # where both were kept they do not add up to the suspect: changed after the merge (trained),
        # or not a merge of these: no test is read
        out["elected"] = out["normalized"] = None
        out["magnitude"] = False
        out["bands"] = {}
        return out
    rates = keep_rates(ks, parents)
    if rates is not None:
        out["keep_rate"] = rates
    bands = {}
    for j, n in enumerate(parents):
        got = [k.bands[j] for k in ks if k.bands[j] is not None]
        if got:
            bands[n] = {
                "agreement": round(float(np.median([b.agreement for b in got])), 4),
                "kept_share": round(float(np.median([b.kept_share for b in got])), 4),
                "above_share": round(float(np.median([b.above_share for b in got])), 4),
                "tensors": len(got),
            }
    out["bands"] = bands
    out["magnitude"] = len(bands) == 2 and all(b["agreement"] >= KEPT["band_agreement"] for b in bands.values())
    return out


def _rate_line(c: np.ndarray) -> tuple[float, float, float] | None:
    """Kept rate against magnitude rank (bins of c: [kept, classified]) as a + b * rank, by
    least squares weighted by each bin's binomial precision: (a, b, standard error of b)."""
    n = c[:, 1].astype(float)
    ok = n > 0
    if ok.sum() < 3:
        return None
    p = c[ok, 0] / n[ok]
    x = (np.arange(len(c))[ok] + 0.5) / len(c)
    w = n[ok] / np.maximum(p * (1 - p), 1e-3)
    design = np.column_stack([np.ones_like(x), x])
    try:
        cov = np.linalg.inv(design.T @ (w[:, None] * design))
    except np.linalg.LinAlgError:
        return None
    a, b = cov @ design.T @ (w * p)
    return float(a), float(b), float(math.sqrt(cov[1, 1]))


def keep_rates(ks: list, parents: list[str]) -> dict | None:
    """How often each parent's delta was kept against its magnitude rank in its row, pooled over
    the two parents: flat at the density for DARE, rising from density - epsilon to density +
    epsilon for DELLA. `abs_weighted_rank` is each parent's mean rank weighted by |d| (median over
    the tensors), which with a density and epsilon gives mergekit's rescale (the kept deltas' L1
    norm brought back to the whole delta's): see `carried`."""
    counts = np.sum([k.rank_kept for k in ks], axis=0)
    line = _rate_line(counts.sum(axis=0))
    if line is None:
        return None
    a, b, se = line
    out: dict = {
        "by_rank": {
            n: [round(float(x), 4) for x in counts[j, :, 0] / np.maximum(counts[j, :, 1], 1)] for j, n in enumerate(parents)
        },
        "intercept": round(a, 4),
        "slope": round(b, 4),
        "slope_se": round(se, 4),
        "density": round(a + b / 2, 4),
        "epsilon": round(b / 2, 4),
    }
    ranks = {n: [k.abs_sums[j][1] / k.abs_sums[j][0] for k in ks if k.abs_sums[j][0] > 0] for j, n in enumerate(parents)}
    out["abs_weighted_rank"] = {n: round(float(np.median(v)), 4) for n, v in ranks.items() if v}
    return out


def carried(kept: dict, density: float, epsilon: float) -> dict[str, float]:
    """Each parent's kept-alone factor over mergekit's rescale at this density and epsilon (the
    whole delta's L1 norm over the kept part's expected one: 1 / (density - epsilon + 2 epsilon
    x the |d|-weighted mean rank)): its weight, or lambda where the merge normalises."""
    ranks = kept["keep_rate"].get("abs_weighted_rank") or {}
    return {n: round(f * (density - epsilon + 2 * epsilon * ranks[n]), 4) for n, f in kept["factors"].items() if n in ranks}


def clean(kept: dict | None, base: str, verdict: dict) -> str:
    """The sentence that makes a suspect a sparse merge when its linear fit did not (empty: the
    kept deltas do not say so): element by element, the suspect is the base's value, one parent's
    delta times one factor, or both added exactly, each on a material share of the elements."""
    if not kept or "added_residual" not in kept or "alone_share" not in kept:
        return ""
    alone = kept["alone_share"]
    if (
        kept["added_residual"] > KEPT["confirm_residual_max"]
        or kept["zero_share"] < KEPT["zero_min"]
        or min(alone.values()) < KEPT["alone_min"]
    ):
        return ""
    first = verdict["verdict"]
    how = (
        "its linear fit leaves more of the residual than a dense merge would (a sparse merge at a low density drops most "
        "of each delta at random, which a linear fit sees as noise)"
        if first == "derived"
        else "its linear fit looked dense (at a high density few elements keep the base's value)"
    )
    return (
        f" First read as `{first}`: {how}. Element by element it is a sparse merge: of {kept['precise_elements']:,} "
        f"precisely measured elements, {kept['zero_share']:.1%} hold {base}'s value, "
        + ", ".join(f"{alone[n]:.1%} one parent's delta alone ({n}, times {f:.3f})" for n, f in kept["factors"].items())
        + f", and the rest both deltas added (relative residual {kept['added_residual']:.1e})."
    )


def not_shared(kept: dict | None) -> float | None:
    """The share of kept elements, where the parents' deltas agree, that kept one parent's delta
    alone, when that says the masks were each parent's own (not SCE's one mask); else None."""
    if not kept or kept["kept_where_agree"] < COMBINED["min_kept"]:
        return None
    alone = 1 - kept["added_where_agree"] / kept["kept_where_agree"]
    return alone if alone > 1 - KEPT["shared_min"] else None


def recipe(fam: str, sparse: dict, parents: list[str]) -> tuple[str, dict, dict[str, float]]:
    """The family (a band of kept magnitudes makes it TIES or breadcrumbs), `evidence.sparse.recipe`
    (merge_method, normalize where it differs from the method's default, density and gamma per
    parent where measured) and the weights the tests give (empty: the fit's stand)."""
    kept = sparse.get("kept_deltas") or {}
    elected = sparse["sign_election"].get("elected")
    normalized = kept.get("normalized")
    out: dict = {}
    weights: dict[str, float] = {}
    if kept.get("magnitude"):
        bands = kept["bands"]
        gamma = {n: round(b["above_share"], 3) for n, b in bands.items()}
        fam = "breadcrumbs" if max(gamma.values()) > KEPT["gamma_min"] else "ties"
        out["density"] = {n: snap(b["kept_share"]) for n, b in bands.items()}
        if fam == "breadcrumbs":
            method = "breadcrumbs_ties" if elected else "breadcrumbs"
            out["gamma"] = gamma
        elif elected is False:  # TIES' trim without its election: breadcrumbs with no gamma
            method = "breadcrumbs"
            out["gamma"] = {n: 0.0 for n in parents}
        else:
            method = "ties"
        if normalized is False:  # no rescale: a kept delta alone enters times its weight
            weights = {n: round(f, 3) for n, f in kept["factors"].items()}
    elif fam in ("della", "dare", "ties/dare") and kept.get("keep_rate"):
        rate = kept["keep_rate"]
        rising = rate["slope"] > max(KEPT["rising_min"], 3 * rate["slope_se"])
        flat = abs(rate["slope"]) < max(KEPT["rising_min"] / 2, 3 * rate["slope_se"])
        fam = "della" if rising else "dare" if flat else fam
        if fam == "della":
            method = "della_linear" if elected is False else "della"
            out["epsilon"] = snap(rate["epsilon"], KEPT["epsilon_snap"])
        else:
            method = "dare_linear" if elected is False else "dare_ties"
        if fam in ("della", "dare"):
            density = snap(rate["density"])
            out["density"] = {n: density for n in parents}
            out["carried"] = carried(kept, density, out.get("epsilon", 0.0))
            if normalized is False and len(out["carried"]) == len(parents):  # each factor is its weight x the rescale
                weights = {n: round(w, 3) for n, w in out["carried"].items()}
            elif normalized and out["carried"]:  # ... or lambda x the rescale
                lam = float(np.median(list(out["carried"].values())))
                if abs(lam - 1) > KEPT["lambda_within"]:
                    out["lambda"] = round(lam, 2)
    elif fam == "della":
        method = "della_linear" if elected is False else "della"
    elif fam == "dare":
        method = "dare_linear" if elected is False else "dare_ties"
    else:
        method = {"breadcrumbs/della": "breadcrumbs", "ties/dare": "dare_ties"}.get(fam, fam)
    if normalized:  # divided by the weights kept: they are the shares of the added deltas
        co = kept["added_coefficients"]
        weights = {n: round(c / sum(co.values()), 3) for n, c in co.items()}
    out["merge_method"] = method
    if normalized is not None and normalized != NORMALIZES.get(method, False):
        out["normalize"] = normalized
    return fam, out, weights


def kept_sentence(kept: dict, base: str, election: bool = True) -> str:
    """The two-parent tests, said (`election`: with the sign election's)."""
    said = ""
    if "ratio" in kept and election:
        share = kept["added_where_conflict"] / max(kept["kept_where_conflict"], 1)
        agree = kept["added_where_agree"] / max(kept["kept_where_agree"], 1)
        how = {
            True: "signs were elected (TIES' election keeps only the deltas that agree with their sum)",
            False: "no sign election (every kept delta was added)",
            None: "whether signs were elected is not clear",
        }[kept["elected"]]
        said += (
            f" Where the parents' deltas from {base} disagree in sign, both were added at {share:.1%} of the elements "
            f"that kept one, against {agree:.1%} where they agree (ratio {kept['ratio']:.3f}, interval "
            f"{kept['interval'][0]:.3f}-{kept['interval'][1]:.3f}): {how}."
        )
    if kept.get("normalized") is not None:
        co = ", ".join(f"{n} {c:.3f}" for n, c in kept["added_coefficients"].items())
        said += f" Where both were kept and agree, they enter with coefficients {co} of their kept-alone sizes: " + (
            "divided by the weights kept (normalize)." if kept["normalized"] else "added as they are."
        )
    if kept.get("magnitude"):
        said += (
            " Each parent's kept deltas are one band of magnitudes ("
            + ", ".join(
                f"{n}: {b['kept_share']:.1%} of elements, {b['above_share']:.1%} above it, agreeing on {b['agreement']:.1%}"
                for n, b in kept["bands"].items()
            )
            + "): dropped by magnitude, the band's share is the density and the share above it breadcrumbs' gamma."
        )
    return said
