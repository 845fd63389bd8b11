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

from lineage.decode import decoded
from lineage.dtypes import view_tolerance
from lineage.errors import LineageError, where
from lineage.gauge import Gauge, distances, gauge_from, procrustes
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

    def run(self, reader: Reader, opts: FitOptions) -> Estimate | str:
        import torch

        shared = min(self.s_view.rows, self.c_view.rows)
        want = max(min(MAX_GAUGE_ROWS, shared), 1)
        try:
            parts = sample_blocks(shared, want)
            es = torch.cat([decoded(reader, self.s_view, a, b) for a, b in parts]).double()
            ec = torch.cat([decoded(reader, self.c_view, a, b) for a, b in parts]).double()
        except (LineageError, ValueError, RuntimeError, OSError) as e:
            return f"{where(self.s_view.segments[0].path, self.s_view.label)}: gauge not estimated ({e})"
        if not (torch.isfinite(es).all() and torch.isfinite(ec).all()):
            return f"{where(self.s_view.segments[0].path, self.s_view.label)}: gauge not estimated (non-finite embedding values)"
        q = procrustes(ec, es)
        g = gauge_from(q, fold=self.fold, signed=self.fold)
        d = distances(q)
        return Estimate(self.candidate, g, es.shape[0], _corr(es, ec), _corr(es, g.apply(ec, "embed")), **d)


@dataclass(frozen=True)
class RefitItem:
    """One suspect tensor against its candidates, each in the suspect's gauge."""

    gid: int
    tensor: str
    role: str  # gauge.role
    s_view: View
    s_gain: View | None  # the norm whose gain the suspect's tensor absorbs (when folding)
    cands: tuple[tuple[str, View, View | None, Gauge | None], ...]  # name, view, gain, transform
    nbytes: int

    def run(self, reader: Reader, opts: FitOptions) -> Stats | str:
        try:
            return self._run(reader)
        except (LineageError, ValueError, RuntimeError, OSError) as e:
            return f"{where(self.s_view.segments[0].path, self.tensor)}: gauge refit failed ({e})"

    def _run(self, reader: Reader) -> Stats | str:
        from lineage.engines.torch_engine import stats_of

        if math.prod((self.s_view.rows, self.s_view.cols)) > MAX_GAUGE_ELEMENTS:
            return f"{where(self.s_view.segments[0].path, self.tensor)}: too large to refit in the suspect's gauge"
        s = self._load(reader, self.s_view, self.s_gain)
        ps = []
        for _, view, gain, g in self.cands:
            c = self._load(reader, view, gain)
            ps.append(g.apply(c, self.role) if g is not None else c)
        tols = [view_tolerance(self.s_view.dtype, v.dtype) for _, v, _, _ in self.cands]
        st = stats_of(s, ps, [n for n, _, _, _ in self.cands], tols)
        st.bytes_read = self.nbytes
        return st.fold()

    def _load(self, reader: Reader, view: View, gain: View | None):
        x = decoded(reader, view, 0, view.rows)
        x = x.reshape(1, -1) if self.role in ("norm", "vec") else x
        if gain is not None:
            x = x.double() * decoded(reader, gain, 0, gain.rows).reshape(1, -1).double()
        return x


def _corr(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
