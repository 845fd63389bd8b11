"""Worker side of the permutation search: read one group of matrices, match units.

Permuting an MLP's hidden units (the rows of its up/gate projections, the
same permutation on the columns of its down projection) leaves the function
unchanged and breaks a tensor-by-tensor comparison of those matrices; so do
permuted attention heads (query rows and output columns in blocks of one
head, key and value rows by key/value head). A `PermutationItem` names one
such group of a suspect and its parent (one layer's MLP, or its heads);
the worker that runs it reads the matrices whole (each at most
MAX_PERMUTATION_ELEMENTS), matches each suspect unit to its most correlated
parent unit, in row blocks so the similarity matrix stays within the chunk,
checks that the matching is one-to-one and the same on every matrix of the
group, and returns the correlation before and after undoing it. Only that
summary travels back; the matrices never leave the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lineage.decode import decoded
from lineage.gauge import Gain, Gauge, role
from lineage.geometry import View
from lineage.options import FitOptions
from lineage.reader import Reader

if TYPE_CHECKING:
    import torch


@dataclass
class Permutation:
    tensors: list[str]  # suspect tensors whose units were permuted
    units: int
    corr_before: float
    corr_after: float
    what: str = "mlp units"  # or "attention heads", "key/value heads"
    #: every searched tensor (matrices, and the biases that follow their rows) -> |s - undone p| / |s|
    rel_after: dict[str, float] | None = None


@dataclass(frozen=True)
class PermutationItem:
    """One group of matrices to search: (suspect tensor, suspect view, parent view, 'rows'|'cols'|'vec').

    'vec' tensors (the biases of the 'rows' matrices) take no part in the
    search; the permutation found is applied to them too, so that the
    distance after undoing covers every tensor the permutation touched."""

    gid: int
    what: str
    unit: int  # rows per unit: 1 for MLP units, head_dim for heads
    mats: tuple[tuple[str, View, View, str], ...]
    nbytes: int
    #: In a residual gauge (explain/gauge.py): the parent's transform into the suspect's, and per
    #: matrix the norm gains (suspect's, parent's) folded into both first
    gauge: Gauge | None = None
    gains: tuple[tuple[str, Gain, Gain], ...] = ()

    def run(self, reader: Reader, opts: FitOptions) -> Permutation | None:
        return search(self, reader, opts)


def _centered_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)


def match_rows(s: torch.Tensor, p: torch.Tensor, chunk_bytes: int = 64 << 20) -> torch.Tensor | None:
    """perm with s[i] ~ p[perm[i]], or None when the best matches are not one-to-one.

    The similarity of every suspect row with every parent row is formed in
    blocks of suspect rows, at most `chunk_bytes` of float64 at a time."""
    import torch

    cs, cp = _centered_rows(s), _centered_rows(p)
    step = max(1, chunk_bytes // (8 * max(1, cp.shape[0])))
    perm = torch.cat([(cs[i : i + step] @ cp.T).argmax(dim=1) for i in range(0, cs.shape[0], step)])
    return perm if len(set(perm.tolist())) == len(perm) else None


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _blocks(x: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows grouped into units of `unit` rows, each flattened into one row."""
    return x.reshape(x.shape[0] // unit, unit * x.shape[1])


def search(item: PermutationItem, reader: Reader, opts: FitOptions) -> Permutation | None:
    """The permutation that explains the group, or None (no one-to-one, agreeing, non-identity match)."""
    import torch

    mats, vecs = {}, {}
    gains = {n: (gs, gp) for n, gs, gp in item.gains}
    for name, sv, pv, kind in item.mats:
        s, p = decoded(reader, sv, 0, sv.rows), decoded(reader, pv, 0, pv.rows)
        if name in gains:
            s, p = (
                x.double() * (decoded(reader, g.view, 0, g.view.rows).reshape(1, -1).double() + g.offset)
                for x, g in zip((s, p), gains[name])
            )
        if item.gauge is not None and kind != "vec":
            p = item.gauge.apply(p, role(name) or "reads")
        if kind == "vec":
            vecs[name] = (s.reshape(-1, 1), p.reshape(-1, 1))
            continue
        mats[name] = (s, p) if kind == "rows" else (s.T.contiguous(), p.T.contiguous())
    if not mats or any(s.shape[0] % item.unit for s, _ in mats.values()):
        return None
    mats = {n: (_blocks(s, item.unit), _blocks(p, item.unit)) for n, (s, p) in mats.items()}
    perms = {name: match_rows(s, p, opts.chunk_bytes) for name, (s, p) in mats.items()}
    found = [v for v in perms.values() if v is not None]
    if not found or any(v is None or not torch.equal(v, found[0]) for v in perms.values()):
        return None
    perm = found[0]
    if torch.equal(perm, torch.arange(len(perm))):
        return None
    before = min(_corr(s, p) for s, p in mats.values())
    after = min(_corr(s, p[perm]) for s, p in mats.values())
    rel = {n: _rel(s, p[perm]) for n, (s, p) in mats.items()}
    for n, (s, p) in vecs.items():
        if s.shape[0] % item.unit == 0 and s.shape[0] // item.unit == len(perm):
            rel[n] = _rel(_blocks(s, item.unit), _blocks(p, item.unit)[perm])
    return Permutation(sorted(mats), len(perm), before, after, item.what, rel)


def _rel(s: torch.Tensor, p: torch.Tensor) -> float:
    """|s - p| / |s|, in float64."""
    s, p = s.double(), p.double()
    return float((s - p).norm() / s.norm().clamp_min(1e-300))
