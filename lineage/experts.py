"""Experts renumbered: the disguise a mixture of experts allows on top of a dense model's.

Renumbering a layer's experts, and the rows of its router with them, leaves
the model's function unchanged (each token still reaches the same experts,
with the same weights) and defeats a comparison by name: expert 3 of the
suspect is then expert 41 of its parent. At 512 experts per layer nearly
every matrix of the model is an expert's, so such a copy reads as
unrelated.

The router says where each expert went: its row e is expert e's key, and
rows of independently trained experts are far apart. `ExpertMatchItem`
reads one layer's router of the suspect and of a candidate (E x hidden,
small beside the experts), removes each router's mean row (adding one
vector to every row changes no routing decision, so an evader may), and
matches rows one-to-one (unpermute.match_rows). Only the matching travels
back. The expert matrices are then compared again, re-paired by it, in
ordinary fit units (explain/experts.py): the match is adopted only when
that comparison relates them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from lineage.decode import decoded
from lineage.dtypes import DTYPES
from lineage.errors import LineageError, where
from lineage.gauge import Gain, Gauge
from lineage.geometry import View, pieces
from lineage.layout import canonical, fused_key, per_expert_key
from lineage.options import FitOptions
from lineage.reader import Reader

#: Largest router matched (elements per side, read whole): Qwen3.5-397B's is 512 x 4096.
MAX_ROUTER_ELEMENTS = 1 << 24
#: 1-D tensors indexed by expert next to a router (DeepSeek-V3 / Qwen3.5's load-balancing bias).
EXPERT_VECTORS = ("gate.e_score_correction_bias", "gate.bias")


def router_name(prefix: str) -> str:
    """Canonical router of the experts under `prefix` (`layers.3.mlp.experts` -> `layers.3.mlp.gate.weight`)."""
    return prefix[: -len("experts")] + "gate.weight"


def experts_prefix(name: str) -> str | None:
    """The canonical experts prefix a tensor belongs to: an expert's matrix (per expert or
    fused), the router, or a per-expert vector of the router; None for anything else."""
    if (k := per_expert_key(name)) is not None:
        return k.prefix
    if (f := fused_key(name)) is not None:
        return f[0]
    c = canonical(name)
    for tail in ("gate.weight", *EXPERT_VECTORS):
        if c.endswith("." + tail):
            return c[: -len(tail)] + "experts"
    return None


def renumbered(name: str, perm: tuple[int, ...]) -> str:
    """A per-expert tensor's name with its expert e replaced by perm[e] (the parent's number)."""
    k = per_expert_key(name)
    assert k is not None
    return re.sub(rf"\.experts\.{k.expert}\.", f".experts.{perm[k.expert]}.", name, count=1)


def reorder(view: View, perm: tuple[int, ...]) -> View:
    """`view` split into len(perm) equal row blocks, block e taken from block perm[e]: the
    parent's experts (or router rows) in the suspect's order."""
    n = len(perm)
    if n == 0 or view.rows % n:
        raise LineageError(f"{view.label}: {view.rows} rows do not split into {n} experts")
    per = view.rows // n
    segs = []
    for e in perm:
        segs += [replace(seg, row0=r0, row1=r1) for seg, r0, r1 in pieces(view, e * per, (e + 1) * per)]
    return View(tuple(segs))


@dataclass
class ExpertMatch:
    """Suspect expert e of the layer under `prefix` is the candidate's expert perm[e]."""

    candidate: str
    prefix: str
    perm: tuple[int, ...]
    corr_before: float  # router rows (mean row removed) by index
    corr_after: float  # and re-paired
    #: the suspect's router tensor; |s - mean row - (c - mean row) re-paired| / |s|, and what rounding
    #: allows of it (both sides' unit roundoff: the evader recomputed the shifted rows): a router
    #: within it differs from the parent's by one vector added to every row, if at all
    tensor: str = ""
    rel_centered: float = math.inf
    tol: float = 0.0

    @property
    def identity(self) -> bool:
        return self.perm == tuple(range(len(self.perm)))


@dataclass(frozen=True)
class ExpertMatchItem:
    """One layer's router of the suspect and of one candidate, to match experts by."""

    gid: int
    candidate: str
    prefix: str
    s_view: View
    c_view: View
    nbytes: int
    #: In a residual gauge (explain/gauge.py): the candidate's transform into the suspect's, and
    #: the norm gains (suspect's, candidate's) the routers absorb when folded
    gauge: Gauge | None = None
    gains: tuple[Gain, Gain] | None = None

    def run(self, reader: Reader, opts: FitOptions) -> ExpertMatch | str | None:
        try:
            return self._run(reader, opts)
        except (LineageError, ValueError, RuntimeError, OSError) as e:
            return f"{where(self.s_view.segments[0].path, self.s_view.label)}: experts not matched ({e})"

    def _run(self, reader: Reader, opts: FitOptions) -> ExpertMatch | None:
        from lineage.unpermute import _corr, match_rows

        if math.prod((self.s_view.rows, self.s_view.cols)) > MAX_ROUTER_ELEMENTS:
            raise LineageError(f"router above {MAX_ROUTER_ELEMENTS} elements")
        s = decoded(reader, self.s_view, 0, self.s_view.rows).double()
        c = decoded(reader, self.c_view, 0, self.c_view.rows).double()
        norm = float(s.norm())
        if self.gains is not None:
            s, c = (
                x * (decoded(reader, g.view, 0, g.view.rows).reshape(1, -1).double() + g.offset)
                for x, g in zip((s, c), self.gains)
            )
        if self.gauge is not None:
            c = self.gauge.apply(c, "reads").double()
        s, c = s - s.mean(dim=0, keepdim=True), c - c.mean(dim=0, keepdim=True)
        perm = match_rows(s, c, opts.chunk_bytes)
        if perm is None:
            return None
        rel = float((s - c[perm]).norm()) / max(norm, 1e-300)
        tol = DTYPES[self.s_view.dtype].unit_roundoff + DTYPES[self.c_view.dtype].unit_roundoff if self.gauge is None else 0.0
        return ExpertMatch(
            self.candidate, self.prefix, tuple(perm.tolist()), _corr(s, c), _corr(s, c[perm]), self.s_view.label, rel, tol
        )
