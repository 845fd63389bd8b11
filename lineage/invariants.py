"""Invariant products: what per-head and per-unit disguises cannot change (issue 15, item 2).

Inside a layer an evader can transform each key/value group's queries by
an invertible A and its keys by A^-T, its values by M and the output
columns of its heads by M^-1, and rescale each MLP unit's up row by s and
its down column by 1/s (or permute heads and units). Every such change
leaves the model's function, and these products, unchanged:

    QK = sum over heads h of W_q,h^T W_k,g(h)      (hidden x hidden)
    OV = sum over heads h of W_o,h W_v,g(h)
    MLP = W_down W_up

(q, k, v and up with their norm gains folded, so that rescaled gains do
not change them either). They are compared sandwiched between a fixed
Gaussian probe S (PROBES x hidden, the same seed for every model): S X S^T
is small, and two models in one residual gauge give the same probe
products exactly when their invariants agree. The part of each product
along the identity (its trace), which unrelated models share (heads that
attend to the token itself, units that copy), is removed first: what
remains has mean zero between unrelated models, and the permutation null
of its statistics holds (measured in the evaluation set's controls).

The products are quadratic in the weights, so they witness relatedness,
not blend weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lineage.decode import decoded
from lineage.dtypes import DTYPES, MIXED
from lineage.errors import LineageError, where
from lineage.gauge import Gain, Gauge
from lineage.geometry import View
from lineage.options import FitOptions
from lineage.reader import Reader
from lineage.stats import Stats

#: Rows of the probe: enough elements (PROBES^2) for a sharp correlation, cheap at any hidden size.
PROBES = 256
PROBE_SEED = 15
#: Largest matrix read for an invariant (elements), like the permutation search's.
MAX_INVARIANT_ELEMENTS = 1 << 26

#: The tensors of one layer each invariant reads, by their role in it (Llama and BERT names).
PARTS = {
    "q": re.compile(r"(self_attn\.q_proj|attention\.self\.query)\.weight$"),
    "k": re.compile(r"(self_attn\.k_proj|attention\.self\.key)\.weight$"),
    "v": re.compile(r"(self_attn\.v_proj|attention\.self\.value)\.weight$"),
    "o": re.compile(r"(self_attn\.o_proj|attention\.output\.dense)\.weight$"),
    "up": re.compile(r"(mlp\.up_proj|intermediate\.dense)\.weight$"),
    "down": re.compile(r"(mlp\.down_proj|(?<!attention\.)output\.dense)\.weight$"),
}
KINDS = {"qk": ("q", "k"), "ov": ("o", "v"), "mlp": ("down", "up")}
#: What a disagreement of the direct matrices with agreeing invariants means.
DISGUISE = {
    "qk": "Q/K heads transformed or permuted",
    "ov": "V/O heads transformed or permuted",
    "mlp": "MLP units rescaled or permuted",
}


def probe(hidden: int):
    import torch

    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(min(PROBES, hidden), hidden, generator=g, dtype=torch.float64) / hidden**0.5


def _expand(x, rows: int, head_dim: int):
    """x (kv heads x head_dim rows) with each key/value head repeated for its query heads."""
    kv = x.shape[0] // head_dim
    if kv * head_dim != x.shape[0] or rows % x.shape[0]:
        raise ValueError(f"{x.shape[0]} key/value rows do not divide into the {rows} query rows by head_dim {head_dim}")
    rep = rows // x.shape[0]
    return x.reshape(kv, head_dim, -1).repeat_interleave(rep, dim=0).reshape(rows, -1)


def sandwich(kind: str, m: dict, head_dim: int | None, s):
    """S X S^T of invariant `kind` from one model's matrices `m` (float64, folded, in the
    suspect's residual gauge), its identity part removed."""

    h = s.shape[1]
    if kind == "qk":
        q, k = m["q"], m["k"]
        k = k if k.shape[0] == q.shape[0] else _expand(k, q.shape[0], head_dim or 0)
        left, right, trace = s @ q.T, k @ s.T, float((q * k).sum())
    elif kind == "ov":
        o, v = m["o"], m["v"]
        v = v if v.shape[0] == o.shape[1] else _expand(v, o.shape[1], head_dim or 0)
        left, right, trace = s @ o, v @ s.T, float((o.T * v).sum())
    else:
        down, up = m["down"], m["up"]
        left, right, trace = s @ down, up @ s.T, float((down.T * up).sum())
    return left @ right - (trace / h) * (s @ s.T)


@dataclass
class LayerInvariants:
    layer: str
    stats: dict[str, Stats]  # kind -> Stats of the suspect's probe product against the parent's
    tol: float  # relative distance explained by the two models' storage rounding


@dataclass(frozen=True)
class InvariantItem:
    """One layer: the suspect's matrices and the parent's (name, view, gain view, role), the parent's gauge."""

    gid: int
    layer: str
    parent: str
    suspect: tuple[tuple[str, View, Gain | None], ...]  # part, view, gain (folded when given)
    cand: tuple[tuple[str, View, Gain | None], ...]
    gauge: Gauge | None
    head_dim: int | None
    nbytes: int

    def run(self, reader: Reader, opts: FitOptions) -> LayerInvariants | str:
        try:
            return self._run(reader)
        except (LineageError, ValueError, RuntimeError, OSError) as e:
            v = self.suspect[0][1]
            return f"{where(v.segments[0].path, self.layer)}: invariants not computed ({e})"

    def _load(self, reader: Reader, parts, gauge: Gauge | None) -> dict:
        out = {}
        for part, view, gain in parts:
            if view.rows * view.cols > MAX_INVARIANT_ELEMENTS:
                raise ValueError(f"{view.label} is too large ({view.rows * view.cols} elements)")
            x = decoded(reader, view, 0, view.rows).double()
            if gain is not None:
                x = x * (decoded(reader, gain.view, 0, gain.view.rows).reshape(1, -1).double() + gain.offset)
            if gauge is not None:
                x = gauge.apply(x, "writes" if part in ("o", "down") else "reads")
            out[part] = x
        return out

    def _run(self, reader: Reader) -> LayerInvariants:
        from lineage.engines.torch_engine import stats_of

        ms, mc = self._load(reader, self.suspect, None), self._load(reader, self.cand, self.gauge)
        hidden = ms["q"].shape[1] if "q" in ms else ms["up"].shape[1] if "up" in ms else ms["down"].shape[0]
        s = probe(hidden)
        out = {}
        for kind, (a, b) in KINDS.items():
            if a in ms and b in ms and a in mc and b in mc:
                xs, xc = sandwich(kind, ms, self.head_dim, s), sandwich(kind, mc, self.head_dim, s)
                st = stats_of(xs, [xc], [self.parent], [0.0])
                out[kind] = st.fold()
        dts = [v.dtype for _, v, _ in self.suspect + self.cand]
        units = [DTYPES[d].unit_roundoff for d in dts if d != MIXED]
        # a product of two rounded matrices carries both roundings of each side
        tol = 4.0 * max(units) if units else 0.0
        return LayerInvariants(self.layer, out, tol)
