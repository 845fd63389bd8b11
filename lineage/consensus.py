"""Worker side of the sign-election test (explain/consensus.py): does a sparse merge elect signs?

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
Only small matrices travel back.
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


@dataclass
class ConsensusPart:
    """Grams of [parents' deltas..., suspect's delta] where the parents' deltas conflict in
    sign (`conflict`) and elsewhere (`agree`), and the element counts."""

    tensor: str
    conflict: np.ndarray
    agree: np.ndarray
    n_conflict: int
    n_agree: int


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
        return ConsensusPart(self.tensor, conflict, agree, n_conflict, n_agree)
