"""Refiner: what a DARE merge did with the deltas it kept.

The dropped-delta energy (explain/sparse.py) tells which deltas a sparse
merge dropped, not what it did with the ones it kept. For a `blend` of the
DARE family with its base and two or more parents, this step reads a
bounded sample of rows of up to MAX_CONSENSUS_TENSORS matrices
(lineage/consensus.py, as Ray work) and asks two questions.

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
Magnitude-based drops (TIES, breadcrumbs, DELLA) raise the ratio without
election, so only DARE is judged.

The results are `evidence.sparse.kept_scale` and `.sign_election`,
sentences in the explanation, and the recipe's merge_method (dare_ties or
dare_linear), its density and, for dare_ties, its weights.
"""

from __future__ import annotations

import math

import numpy as np

from lineage.align import Index
from lineage.consensus import (
    MAX_CONSENSUS_ELEMENTS,
    MAX_CONSENSUS_TENSORS,
    SCALE_BIN,
    SCALE_BINS,
    SCALE_MIN_ELEMENTS,
    SCALE_RANGE,
    ConsensusItem,
    ConsensusPart,
)
from lineage.explain.evidence import Evidence
from lineage.explain.thresholds import SIGN_ELECTION
from lineage.geometry import View
from lineage.layout import canonical
from lineage.source import natural_key


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
    def eligible(ev: Evidence, verdict: dict | None) -> tuple[str, list[str]] | None:
        """(base, parents) of a DARE-family blend this step can test, else None."""
        if verdict is None or verdict["verdict"] != "blend" or verdict.get("merge_family") != "dare":
            return None
        if verdict.get("undone") or verdict.get("layer_map") or verdict.get("permutation"):
            return None  # the deltas would be taken in another gauge or between other layers
        base = verdict.get("base")
        parents = [p["name"] for p in verdict["parents"] if p["name"] != base]
        if not base or len(parents) < 2 or not ev.models or any(n not in ev.models for n in [ev.suspect, base, *parents]):
            return None
        return base, parents

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        got = self.eligible(ev, verdict)
        if got is None:
            return []
        base, parents = got
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
        base, parents = got
        parts = [r for r in results if isinstance(r, ConsensusPart)]
        if not parts:
            return None
        sparse = dict(verdict["evidence"].get("sparse") or {})
        scales = {n: scale_peak(sum(p.scales[j] for p in parts)) for j, n in enumerate(parents)}
        sparse["kept_scale"] = {n: v for n, v in scales.items() if v}
        sparse["sign_election"], said = election(parts, base, parents)
        if sparse["sign_election"].get("elected"):
            sparse["recipe_weights"] = sparse["sign_election"]["weights_where_signs_agree"]
        if sparse["kept_scale"]:
            said += (
                " Where only one parent's delta was kept, it was scaled by "
                + ", ".join(f"{v['scale']:.3f} ({n})" for n, v in sparse["kept_scale"].items())
                + ": DARE's weight over the density."
            )
        errors = [r for r in results if isinstance(r, str)]
        if errors:
            sparse["sign_election"]["errors"] = errors[:5]
        ev.analyses["sparse"] = sparse
        return {**verdict, "evidence": {**verdict["evidence"], "sparse": sparse}, "explanation": verdict["explanation"] + said}


def scale_peak(hist: np.ndarray) -> dict | None:
    """The factor (s - b) / (p - b) takes most often, from its histogram (None: too few measured)."""
    if hist.sum() < SCALE_MIN_ELEMENTS:
        return None
    centers = -SCALE_RANGE + (np.arange(SCALE_BINS) + 0.5) * SCALE_BIN
    return {"scale": round(float(centers[int(hist.argmax())]), 3), "elements": int(hist.sum())}


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
