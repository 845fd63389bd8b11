"""Worker side of the gauge refiner (explain/gauge.py): estimate a residual transform, refit in it.

Two kinds of work item, both run on Ray like every fit, both bounded:

- `EstimateItem`: a bounded sample of the embedding rows of the tokens the
  suspect and one candidate share (at most MAX_GAUGE_ROWS, in evenly spaced
  blocks), and the orthogonal Procrustes transform between them (gauge.py).
  Only the transform (hidden x hidden floats) and a few numbers travel back.
- `RefitItem`: one suspect matrix and the candidates' matrices of the same
  name, each candidate brought into the suspect's gauge (norm gains folded,
  its transform applied), and the same sufficient statistics the fit
  computes (engines.torch_engine.stats_of). Matrices above
  MAX_GAUGE_ELEMENTS are not refitted: the row says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lineage.decode import decoded
from lineage.dtypes import view_tolerance
from lineage.errors import LineageError, where
from lineage.gauge import Gain, Gauge, distances, gauge_from
from lineage.geometry import View
from lineage.options import FitOptions
from lineage.reader import Reader
from lineage.stats import Stats

#: Embedding rows the transform is estimated from (per model): the estimate
#: needs many more rows than the hidden size, and no more than that.
MAX_GAUGE_ROWS = 16384
#: Blocks the sampled rows come in, evenly spaced over the shared vocabulary.
GAUGE_BLOCKS = 8
#: Largest matrix refitted in the suspect's gauge (elements per side, read whole).
MAX_GAUGE_ELEMENTS = 1 << 26
#: Largest hidden size a transform is estimated for: the estimate holds a hidden x hidden
#: float64 cross product and its SVD (512 MB at 8192; Qwen3.5-397B's is 4096).
MAX_GAUGE_HIDDEN = 8192
#: Token rows read per block when the rows are paired by token (one read per row).
PAIR_BLOCK = 1024


def sample_blocks(rows: int, want: int, blocks: int = GAUGE_BLOCKS) -> list[tuple[int, int]]:
    """Up to `want` of `rows` rows as `blocks` evenly spaced contiguous ranges."""
    if want >= rows:
        return [(0, rows)]
    size = max(1, want // blocks)
    step = rows / blocks
    return [(int(i * step), min(rows, int(i * step) + size)) for i in range(blocks)]


@dataclass
class Estimate:
    candidate: str
    gauge: Gauge
    rows: int
    corr_before: float  # the embeddings, as they are
    corr_after: float  # and with the candidate's transformed
    from_identity: float
    from_permutation: float


@dataclass(frozen=True)
class EstimateItem:
    gid: int
    candidate: str
    s_view: View
    c_view: View
    fold: bool  # pre-norm: gains are folded, any rotation is allowed
    nbytes: int
    #: (suspect rows, candidate rows) of a sample of the tokens both have, when the two
    #: vocabularies order them differently (tokens.py); None: rows of equal index
    pairs: tuple[np.ndarray, np.ndarray] | None = None

    def run(self, reader: Reader, opts: FitOptions) -> Estimate | str:
        """Block by block (one block of rows of each side in memory at a time, plus the
        hidden x hidden float64 cross product): the transform, then the fit it gives."""
        import torch

        here = where(self.s_view.segments[0].path, self.s_view.label)

        def check(*xs):
            if not all(torch.isfinite(x).all() for x in xs):
                raise ValueError("non-finite embedding values")
            return xs

        def blocks():
            """(suspect rows, the candidate's rows of the same tokens, the candidate's rows of equal index)."""
            if self.pairs is None:
                shared = min(self.s_view.rows, self.c_view.rows)
                for a, b in sample_blocks(shared, max(min(MAX_GAUGE_ROWS, shared), 1)):
                    es, ec = decoded(reader, self.s_view, a, b).double(), decoded(reader, self.c_view, a, b).double()
                    yield check(es, ec, ec)
                return
            si, ci = self.pairs
            for k in range(0, len(si), PAIR_BLOCK):
                es = torch.cat([decoded(reader, self.s_view, int(i), int(i) + 1) for i in si[k : k + PAIR_BLOCK]]).double()
                ec = torch.cat([decoded(reader, self.c_view, int(j), int(j) + 1) for j in ci[k : k + PAIR_BLOCK]]).double()
                naive = [int(i) for i in si[k : k + PAIR_BLOCK] if i < self.c_view.rows]
                en = torch.cat([decoded(reader, self.c_view, i, i + 1) for i in naive]).double() if naive else ec[:0]
                yield check(es, ec, en)

        try:
            h = self.s_view.cols
            cross = torch.zeros(h, h, dtype=torch.float64)
            before, rows = _Corr(), 0
            for es, ec, en in blocks():
                cross += ec.T @ es
                before.add(es[: en.shape[0]], en)  # the comparison as it was: rows of equal index
                rows += es.shape[0]
            u, _, vh = torch.linalg.svd(cross)
            q = u @ vh
            g = gauge_from(q, fold=self.fold, signed=self.fold)
            after = _Corr()
            for es, ec, _ in blocks():
                after.add(es, g.apply(ec, "embed"))
        except (LineageError, ValueError, RuntimeError, OSError) as e:
            return f"{here}: gauge not estimated ({e})"
        return Estimate(self.candidate, g, rows, before.value, after.value, **distances(q))


class _Corr:
    """Pearson correlation of two tensors given block by block."""

    def __init__(self) -> None:
        self.n, self.sa, self.sb, self.saa, self.sbb, self.sab = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, a, b) -> None:
        a, b = a.double().flatten(), b.double().flatten()
        self.n += a.numel()
        self.sa, self.sb = self.sa + float(a.sum()), self.sb + float(b.sum())
        self.saa, self.sbb, self.sab = self.saa + float(a @ a), self.sbb + float(b @ b), self.sab + float(a @ b)

    @property
    def value(self) -> float:
        n = max(self.n, 1)
        cov = self.sab - self.sa * self.sb / n
        va, vb = self.saa - self.sa**2 / n, self.sbb - self.sb**2 / n
        return cov / max((va * vb) ** 0.5, 1e-300)


@dataclass(frozen=True)
class RefitItem:
    """One suspect tensor against its candidates, each in the suspect's gauge."""

    gid: int
    tensor: str
    role: str  # gauge.role
    s_view: View
    s_gain: Gain | None  # the norm whose gain the suspect's tensor absorbs (when folding)
    cands: tuple[tuple[str, View, Gain | None, Gauge | None], ...]  # name, view, gain, transform
    nbytes: int
    #: A vocabulary matrix compared on the tokens every candidate shares with the suspect: the
    #: suspect's rows, and each candidate's rows of the same tokens (in `cands` order)
    rows: tuple[np.ndarray, tuple[np.ndarray, ...]] | None = None

    def run(self, reader: Reader, opts: FitOptions) -> Stats | str:
        try:
            return self._run(reader)
        except (LineageError, ValueError, RuntimeError, OSError) as e:
            return f"{where(self.s_view.segments[0].path, self.tensor)}: gauge refit failed ({e})"

    def _run(self, reader: Reader) -> Stats | str:
        import torch

        from lineage.engines.torch_engine import stats_of

        if math.prod((self.s_view.rows, self.s_view.cols)) > MAX_GAUGE_ELEMENTS:
            return f"{where(self.s_view.segments[0].path, self.tensor)}: too large to refit in the suspect's gauge"
        s = self._load(reader, self.s_view, self.s_gain)
        if self.rows is not None:
            s = s[torch.from_numpy(self.rows[0])]
        ps = []
        for k, (_, view, gain, g) in enumerate(self.cands):
            c = self._load(reader, view, gain)
            if self.rows is not None:
                c = c[torch.from_numpy(self.rows[1][k])]
            ps.append(g.apply(c, self.role) if g is not None else c)
        tols = [view_tolerance(self.s_view.dtype, v.dtype) for _, v, _, _ in self.cands]
        st = stats_of(s, ps, [n for n, _, _, _ in self.cands], tols)
        st.bytes_read = self.nbytes
        return st.fold()

    def _load(self, reader: Reader, view: View, gain: Gain | None):
        x = decoded(reader, view, 0, view.rows)
        x = x.reshape(1, -1) if self.role in ("norm", "vec") else x
        if gain is not None:
            x = x.double() * (decoded(reader, gain.view, 0, gain.view.rows).reshape(1, -1).double() + gain.offset)
        return x
