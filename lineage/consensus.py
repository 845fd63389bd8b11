"""Worker side of explain/consensus.py: what a sparse merge did with the deltas it kept.

Two questions, answered from one bounded sample of rows per matrix.

Did it elect signs?
TIES-style merges (mergekit's ties, dare_ties, breadcrumbs_ties, della)
keep, per element, only the parents' deltas whose sign agrees with the sign
of their weighted sum; linear ones (dare_linear, breadcrumbs, della_linear)
add every kept delta. The difference shows only where the parents' deltas
from the base disagree in sign. So, over a bounded sample of rows of some
matrices, the worker splits the elements into those where the parents'
deltas conflict in sign (some up, some down) and the rest, and returns the
Gram matrix of [parents' deltas..., suspect's delta] over each part: the
suspect's delta fitted on the parents' in each part gives two sets of
coefficients, equal in expectation for a linear merge whose drops are
random (DARE's mask does not look at signs) and apart for an elected one.

By what factor was each parent's kept delta scaled (DARE: weight /
density)? Where a parent's delta is large against the suspect's value
(|p - b| >= |s| / SCALE_PRECISION, so that the storage rounding of s moves
their ratio by well under 1%), the ratio (s - b) / (p - b) is that factor
wherever only this parent's delta was kept: the mode of a histogram of the
ratios (SCALE_BINS).

With two parents, three more, from the elements where all three deltas are
measured precisely. Each parent's kept delta, where it was kept alone, is
scaled by one factor per tensor (DARE and DELLA's rescale, times the weight
unless the merge renormalises): the mode of that tensor's ratios. An element
is then `zero` (both deltas dropped), `single` (one parent's delta, times its
factor, within SINGLE_TOL) or `combined` (both kept and added). An elected
merge never combines deltas of opposite sign: where the parents' deltas
conflict, `combined` is all but absent, while a linear one combines them
there about as often as where they agree (`counts`). Where they agree and
both were kept, the suspect's delta fitted on the two scaled deltas gives
coefficients summing to 2 for a merge that adds them (every linear or
unnormalised one) and to 1 for one that divides by the weights kept (TIES and
DELLA's `normalize`), the weights' shares (`combined`). And per parent, the
band of delta magnitudes that was kept (`Band`): a magnitude-based merge keeps
exactly the deltas between two magnitudes (TIES: the largest `density`;
breadcrumbs: below the largest `gamma` as well), a random one has no such
band (its agreement stays near the density).

Only small matrices and histograms travel back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lineage.decode import decoded
from lineage.errors import LineageError, where
from lineage.gauge_work import sample_blocks
from lineage.geometry import View
from lineage.options import FitOptions
from lineage.reader import Reader

#: Elements per side read for one matrix (rows in evenly spaced blocks): the test needs
#: millions of elements in all, not whole matrices.
MAX_CONSENSUS_ELEMENTS = 1 << 20
#: Matrices read, evenly spaced over the model's eligible ones.
MAX_CONSENSUS_TENSORS = 24
#: Ratios (s - b) / (p - b) are histogrammed over +-SCALE_RANGE in bins of SCALE_BIN
#: (|ratio| < SCALE_BIN * 10 is left out: elements where the delta was dropped).
SCALE_RANGE = 16.0
SCALE_BIN = 0.005
SCALE_BINS = int(2 * SCALE_RANGE / SCALE_BIN)
#: An element counts for a parent's ratio where |p - b| >= |s| / SCALE_PRECISION: the
#: rounding of s (2^-9 of it) is then at most 2^-9 * SCALE_PRECISION of the delta.
SCALE_PRECISION = 4.0
#: Fewer precisely measured ratios than this per parent give no factor.
SCALE_MIN_ELEMENTS = 2000
#: Per tensor, fewer precise ratios than this give no factor for the two-parent tests.
TENSOR_MIN_RATIOS = 200
#: An element is one parent's kept delta alone when (s - b) / (p - b) is within this share of
#: that parent's factor, and `zero` when |s - b| is below this share of each scaled delta.
SINGLE_TOL = 0.005
#: ...give or take the storage rounding of s (half a BF16 step is 2^-9 of it; twice that), and
#: as much again times the factor for the parents' and base's rounding, where a merge was
#: computed in BF16 (mergekit casts its inputs to its `dtype`).
ROUNDING = 2.0**-8
#: Kept-or-dropped rates are counted in this many bins of a delta's magnitude rank within its
#: row (0: the row's smallest, 1: its largest), as DELLA ranks them.
RANK_BINS = 10


def factor(hist: np.ndarray, least: int) -> float | None:
    """The ratio a histogram of (s - b) / (p - b) takes most often (its bin's centre), or None
    with fewer than `least` ratios."""
    if hist.sum() < least:
        return None
    return float(-SCALE_RANGE + (int(hist.argmax()) + 0.5) * SCALE_BIN)


@dataclass
class Band:
    """The magnitudes of one parent's delta that were kept, as one interval [low, high]
    (the best by agreement with the elements' kept-or-dropped status, where the parents'
    deltas agree in sign, so that no election drops them): `kept_share` and `above_share` of
    the tensor's sampled elements lie within it and above it, and `agreement` of the
    `classified` elements have the status the interval predicts: the lesser of the shares of
    kept ones inside it and of dropped ones outside it (a band that keeps nearly everything
    agrees with nearly every element of a model trained after the merge, but not with the
    few it calls dropped)."""

    low: float
    high: float
    kept_share: float
    above_share: float
    agreement: float
    classified: int


@dataclass
class Kept:
    """The two-parent tests of one tensor (see the module's docstring): each parent's factor,
    `counts` [[conflict combined, conflict kept], [agree combined, agree kept]] (kept: not zero),
    `combined` the Gram of [f1 d1, f2 d2, s - b] over agreeing elements where both were kept, and
    each parent's `bands` (None: too few classified)."""

    factors: tuple[float, float]
    counts: np.ndarray
    combined: np.ndarray
    bands: tuple[Band | None, Band | None]
    rank_kept: np.ndarray  # per parent and rank bin: [kept, classified], where the deltas agree
    abs_sums: np.ndarray  # per parent: [sum |d|, sum rank * |d|] over every sampled element
    shares: np.ndarray  # precise elements: [zero, parent 1's alone, parent 2's alone, all]


def band(mag: np.ndarray, kept: np.ndarray, every: np.ndarray) -> Band | None:
    """The interval of magnitudes `mag` (classified elements, kept or not) that agrees best
    with `kept`: the maximum-sum run (+1 kept, -1 dropped) in magnitude order."""
    if len(mag) < TENSOR_MIN_RATIOS or not kept.any():
        return None
    order = np.argsort(mag, kind="stable")
    m, v = mag[order], np.where(kept[order], 1, -1)
    c = np.concatenate([[0], np.cumsum(v)])
    low_at = np.minimum.accumulate(c[:-1])  # the best start before each end: where the prefix is least
    gain = c[1:] - low_at
    end = int(gain.argmax())
    start = int(np.flatnonzero(c[: end + 1] == low_at[end])[-1])
    lo, hi = float(m[start]), float(m[end])
    inside = (m >= lo) & (m <= hi)
    kept_in = float((inside & (v > 0)).sum() / max(int((v > 0).sum()), 1))
    dropped_out = float((~inside & (v < 0)).sum() / max(int((v < 0).sum()), 1)) if (v < 0).any() else 0.0
    return Band(
        lo,
        hi,
        float(((every >= lo) & (every <= hi)).mean()),
        float((every > hi).mean()),
        min(kept_in, dropped_out),
        len(m),
    )


def two_parents(x: np.ndarray, every: list[np.ndarray], hists: np.ndarray, sums: np.ndarray) -> Kept | None:
    """The two-parent tests over `x` (rows [d1, d2, s - b, |s|, rank1, rank2] where the deltas
    are precise), `every` each parent's |delta| over all sampled elements, this tensor's ratio
    histograms and `sums` (Kept.abs_sums)."""
    f = [factor(h, TENSOR_MIN_RATIOS) for h in hists]
    if f[0] is None or f[1] is None or len(x) < TENSOR_MIN_RATIOS:
        return None
    d, ds, slack = x[:, :2], x[:, 2], ROUNDING * x[:, 3]
    g = []
    for j, fj in enumerate(f):  # the histogram's bin, refined: the median ratio near it, recentred
        r = ds / d[:, j]
        for _ in range(3):
            near = r[np.abs(r - fj) <= max(SINGLE_TOL * abs(fj), SCALE_BIN)]
            fj = float(np.median(near)) if len(near) else fj
        g.append(fj)
    scaled = d * np.array(g)
    tol = SINGLE_TOL * np.abs(scaled) + slack[:, None] * (1.0 + np.abs(g))  # s's rounding, and the inputs' times g
    single = np.abs(ds[:, None] - scaled) <= tol
    zero = (np.abs(ds)[:, None] <= tol).all(axis=1)
    one = single.any(axis=1) & ~zero
    combined = ~one & ~zero
    conflict = (d[:, 0] * d[:, 1]) < 0
    counts = np.array(
        [
            [int((combined & conflict).sum()), int((~zero & conflict).sum())],
            [int((combined & ~conflict).sum()), int((~zero & ~conflict).sum())],
        ],
        dtype=np.int64,
    )
    both = combined & ~conflict
    y = np.column_stack([scaled[both], ds[both]])
    bands = []
    rank_kept = np.zeros((2, RANK_BINS, 2), dtype=np.int64)
    ok = ~conflict & ~(single[:, 0] & single[:, 1])
    for j in range(2):  # kept: alone or with the other; dropped: both zero or the other alone
        kept = (single[:, j] & ~single[:, 1 - j]) | combined
        bands.append(band(np.abs(d[ok, j]), kept[ok], every[j]))
        bins = np.minimum((x[ok, 4 + j] * RANK_BINS).astype(np.int64), RANK_BINS - 1)
        rank_kept[j, :, 0] = np.bincount(bins[kept[ok]], minlength=RANK_BINS)[:RANK_BINS]
        rank_kept[j, :, 1] = np.bincount(bins, minlength=RANK_BINS)[:RANK_BINS]
    shares = np.array(
        [int(zero.sum()), *(int((single[:, j] & ~single[:, 1 - j] & ~zero).sum()) for j in range(2)), len(x)], dtype=np.int64
    )
    return Kept((g[0], g[1]), counts, y.T @ y, (bands[0], bands[1]), rank_kept, sums, shares)


@dataclass
class ConsensusPart:
    """Grams of [parents' deltas..., suspect's delta] where the parents' deltas conflict in
    sign (`conflict`) and elsewhere (`agree`), the element counts, and per parent the
    histogram of (s - b) / (p - b) where that is measured precisely (`scales`, k x SCALE_BINS)."""

    tensor: str
    conflict: np.ndarray
    agree: np.ndarray
    n_conflict: int
    n_agree: int
    scales: np.ndarray
    kept: Kept | None = None


@dataclass(frozen=True)
class ConsensusItem:
    """One matrix: the suspect's view, the base's and each parent's (same shape)."""

    gid: int
    tensor: str
    suspect: View
    base: View
    parents: tuple[View, ...]
    nbytes: int

    def run(self, reader: Reader, opts: FitOptions) -> ConsensusPart | str:
        try:
            return self._run(reader)
        except (LineageError, ValueError, RuntimeError, OSError) as e:
            return f"{where(self.suspect.segments[0].path, self.tensor)}: sign election not measured ({e})"

    def _run(self, reader: Reader) -> ConsensusPart:
        v = self.suspect
        want = max(1, MAX_CONSENSUS_ELEMENTS // max(v.cols, 1))
        k = len(self.parents)
        conflict = np.zeros((k + 1, k + 1))
        agree = np.zeros((k + 1, k + 1))
        n_conflict = n_agree = 0
        scales = np.zeros((k, SCALE_BINS), dtype=np.int64)
        precise: list[np.ndarray] = []  # two parents: rows [d1, d2, s - b, |s|, rank1, rank2], precise
        every: list[list[np.ndarray]] = [[] for _ in range(k)]
        sums = np.zeros((2, 2))
        for a, b in sample_blocks(v.rows, want):
            base = decoded(reader, self.base, a, b).double().reshape(-1)
            cols = [decoded(reader, p, a, b).double().reshape(-1) - base for p in self.parents]
            cols.append(decoded(reader, v, a, b).double().reshape(-1) - base)
            x = np.stack([c.numpy() for c in cols], axis=1)
            d = x[:, :k]
            mixed = (d > 0).any(axis=1) & (d < 0).any(axis=1)
            if not np.isfinite(x).all():
                raise ValueError("non-finite values")
            xc, xa = x[mixed], x[~mixed]
            conflict += xc.T @ xc
            agree += xa.T @ xa
            n_conflict += int(mixed.sum())
            n_agree += int((~mixed).sum())
            s_abs, ds = np.abs(x[:, k] + base.numpy()), x[:, k]
            for j in range(k):
                ok = (np.abs(d[:, j]) * SCALE_PRECISION >= s_abs) & (d[:, j] != 0) & (ds != 0)
                t = ds[ok] / d[ok, j]
                t = t[(np.abs(t) >= 10 * SCALE_BIN) & (np.abs(t) < SCALE_RANGE)]
                scales[j] += np.bincount(((t + SCALE_RANGE) / SCALE_BIN).astype(np.int64), minlength=SCALE_BINS)[:SCALE_BINS]
            if k == 2:
                ok = (np.abs(d) * SCALE_PRECISION >= s_abs[:, None]).all(axis=1) & (d != 0).all(axis=1)
                ranks = []
                for j in range(2):  # each delta's magnitude rank within its row, 0 to 1
                    m = np.abs(d[:, j]).reshape(-1, v.cols)
                    r = m.argsort(axis=1, kind="stable").argsort(axis=1) / max(v.cols - 1, 1)
                    ranks.append(r.reshape(-1))
                    sums[j] += (float(m.sum()), float((r * m).sum()))
                    every[j].append(np.abs(d[:, j]))
                precise.append(np.column_stack([x[ok], s_abs[ok], ranks[0][ok], ranks[1][ok]]))
        kept = None
        if k == 2 and precise:
            kept = two_parents(np.concatenate(precise), [np.concatenate(e) for e in every], scales, sums)
        return ConsensusPart(self.tensor, conflict, agree, n_conflict, n_agree, scales, kept)
