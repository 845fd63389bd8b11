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
SCALE_RANGE = 4.0
SCALE_BIN = 0.005
SCALE_BINS = int(2 * SCALE_RANGE / SCALE_BIN)
#: An element counts for a parent's ratio where |p - b| >= |s| / SCALE_PRECISION: the
#: rounding of s (2^-9 of it) is then at most 2^-9 * SCALE_PRECISION of the delta.
SCALE_PRECISION = 4.0
#: Fewer precisely measured ratios than this per parent give no factor.
SCALE_MIN_ELEMENTS = 2000


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
        return ConsensusPart(self.tensor, conflict, agree, n_conflict, n_agree, scales)
