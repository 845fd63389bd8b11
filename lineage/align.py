"""Pair every suspect tensor with the tensor of the same role in each candidate.

Pairing works on canonical names (`layout.canonical`), then on expert
identity so that a fused `experts.gate_up_proj` [E, 2I, H] meets the 2E
per-expert `gate_proj`/`up_proj` matrices of another checkpoint, in either
direction. Embeddings and heads whose vocabularies differ are compared on
their common leading rows. Anything that cannot be paired keeps a reason:
a suspect tensor paired with no candidate becomes a `skipped` row, and a
candidate tensor that no suspect tensor used is counted in the coverage.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from lineage.dtypes import DTYPES
from lineage.errors import LineageError
from lineage.geometry import View, check_scale, crop, matrix_shape, segment
from lineage.header import TensorEntry
from lineage.layout import (
    FUSED,
    SCALE_SUFFIXES,
    ExpertKey,
    canonical,
    component,
    fused_key,
    is_scale,
    layer_index,
    per_expert_key,
)
from lineage.source import Model, natural_key

CROPPABLE = ("embedding", "head")


@dataclass(frozen=True, slots=True)
class Side:
    """One candidate's side of a group: a view, or why there is none."""

    candidate: str
    view: View | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Group:
    """A suspect tensor and what it is compared with."""

    suspect: str
    tensor: str
    canonical: str
    component: str
    layer: int | None
    shape: tuple[int, ...]
    dtype: str
    view: View | None
    sides: tuple[Side, ...]
    status: str = "ok"  # ok | skipped
    reason: str = ""

    @property
    def paired(self) -> list[Side]:
        return [s for s in self.sides if s.view is not None]

    @property
    def nbytes(self) -> int:
        """Bytes a worker reads to fit this group."""
        if self.view is None:
            return 0
        return self.view.nbytes + sum(s.view.nbytes for s in self.paired)  # type: ignore[union-attr]


@dataclass
class Index:
    """A candidate's tensors by canonical name and by expert identity."""

    model: Model
    by_name: dict[str, TensorEntry] = field(default_factory=dict)
    experts: dict[ExpertKey, TensorEntry] = field(default_factory=dict)
    fused: dict[tuple[str, str], TensorEntry] = field(default_factory=dict)
    expert_prefixes: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, model: Model) -> Index:
        ix = cls(model)
        for name, e in model.tensors.items():
            if is_scale(name):
                continue
            ix.by_name.setdefault(canonical(name), e)
            if (k := per_expert_key(name)) is not None:
                ix.experts[k] = e
                ix.expert_prefixes.add(k.prefix)
            elif (f := fused_key(name)) is not None:
                ix.fused[f] = e
        return ix

    def seg(self, e: TensorEntry, rows: tuple[int, int] | None = None):
        """A segment of `e` with its FP8 block scale attached and checked."""
        scale = None
        if e.dtype.startswith("F8_"):
            for suf in SCALE_SUFFIXES:
                scale = self.model.tensors.get(e.name + suf)
                if scale is not None:
                    check_scale(e, scale)
                    break
        return segment(e, scale, rows)


def align(suspect: Model, candidates: list[Model]) -> tuple[list[Group], dict[str, list[str]]]:
    """Groups for every suspect tensor, and each candidate's unused tensors."""
    s_ix = Index.build(suspect)
    c_ixs = [Index.build(c) for c in candidates]
    used: dict[str, set[str]] = defaultdict(set)
    groups = []
    for name in sorted(suspect.tensors, key=_order):
        if is_scale(name):
            continue
        e = suspect.tensors[name]
        groups.append(_group(s_ix, e, c_ixs, used))
    unmatched = {
        ix.model.name: sorted(n for n in ix.model.tensors if not is_scale(n) and n not in used[ix.model.name]) for ix in c_ixs
    }
    return groups, unmatched


def _order(name: str) -> tuple:
    return tuple(natural_key(name))


def _group(s_ix: Index, e: TensorEntry, c_ixs: list[Index], used: dict[str, set[str]]) -> Group:
    meta = dict(
        suspect=s_ix.model.name,
        tensor=e.name,
        canonical=canonical(e.name),
        component=component(e.name),
        layer=layer_index(e.name),
        shape=e.shape,
        dtype=e.dtype,
    )
    if not DTYPES[e.dtype].is_float:
        return Group(**meta, view=None, sides=(), status="skipped", reason=f"{e.dtype} tensor is not a weight")
    if e.numel == 0:
        return Group(**meta, view=None, sides=(), status="skipped", reason="empty tensor")
    try:
        s_view = View((s_ix.seg(e),))
    except LineageError as err:
        return Group(**meta, view=None, sides=(), status="error", reason=str(err))
    sides = []
    for ix in c_ixs:
        try:
            side = _pair(e, ix, meta["component"])
        except LineageError as err:
            side = Side(ix.model.name, None, str(err))
        if side.view is not None:
            used[ix.model.name].update(s.name for s in side.view.segments)
        sides.append(side)
    paired = [s for s in sides if s.view is not None]
    if not paired:
        reasons = "unpaired: " + ("; ".join(f"{s.candidate}: {s.reason}" for s in sides) or "no candidates")
        return Group(**meta, view=None, sides=tuple(sides), status="skipped", reason=reasons)
    rows = min(s.view.rows for s in paired)  # type: ignore[union-attr]
    if rows != s_view.rows or any(s.view.rows != rows for s in paired):  # type: ignore[union-attr]
        s_view = crop(s_view, rows)
        sides = [Side(s.candidate, crop(s.view, rows), s.reason) if s.view is not None else s for s in sides]
    return Group(**meta, view=s_view, sides=tuple(sides))


def _pair(e: TensorEntry, ix: Index, comp: str) -> Side:
    name = ix.model.name
    ce = ix.by_name.get(canonical(e.name))
    if ce is not None:
        if not DTYPES[ce.dtype].is_float:
            return Side(name, None, f"{ce.name} is {ce.dtype}, not a float weight")
        if ce.shape == e.shape:
            return Side(name, View((ix.seg(ce),)))
        sr, sc = matrix_shape(e.shape)
        cr, cc = matrix_shape(ce.shape)
        if comp in CROPPABLE and len(e.shape) == len(ce.shape) == 2 and sc == cc:
            return Side(name, View((ix.seg(ce, (0, min(sr, cr))),)))
        return Side(name, None, f"shape mismatch: suspect {list(e.shape)} vs {ce.name} {list(ce.shape)}")
    if (fk := fused_key(e.name)) is not None:
        return _fused_to_per_expert(e, fk, ix)
    if (pk := per_expert_key(e.name)) is not None:
        return _per_expert_to_fused(e, pk, ix)
    return Side(name, None, "no tensor with this name")


def _fused_to_per_expert(e: TensorEntry, fk: tuple[str, str], ix: Index) -> Side:
    """Suspect fused [E, rows, cols]: the candidate's per-expert matrices, stacked."""
    prefix, kind = fk
    name = ix.model.name
    if prefix not in ix.expert_prefixes:
        return Side(name, None, f"no {prefix}.{kind} nor per-expert tensors under {prefix}")
    if len(e.shape) != 3:
        return Side(name, None, f"fused expert tensor has shape {list(e.shape)}, expected [E, rows, cols]")
    n_exp, rows, cols = e.shape
    projs = FUSED[kind]
    segs = []
    for j in range(n_exp):
        for proj in projs:
            pe = ix.experts.get(ExpertKey(prefix, j, proj))
            want = (rows // len(projs), cols)
            if pe is None:
                return Side(name, None, f"per-expert tensor {prefix}.{j}.{proj} missing")
            if pe.shape != want:
                return Side(name, None, f"{pe.name} has shape {list(pe.shape)}, expected {list(want)}")
            segs.append(ix.seg(pe))
    return Side(name, View(tuple(segs)))


def _per_expert_to_fused(e: TensorEntry, pk: ExpertKey, ix: Index) -> Side:
    """Suspect per-expert matrix: its rows inside the candidate's fused tensor."""
    name = ix.model.name
    kind = "down_proj" if pk.proj == "down_proj" else "gate_up_proj"
    fe = ix.fused.get((pk.prefix, kind))
    if fe is None:
        return Side(name, None, f"no per-expert or fused {pk.prefix}.{kind}")
    projs = FUSED[kind]
    n_exp, rows, cols = fe.shape if len(fe.shape) == 3 else (0, 0, 0)
    per = rows // len(projs)
    if pk.expert >= n_exp or e.shape != (per, cols):
        return Side(name, None, f"{fe.name} {list(fe.shape)} has no expert {pk.expert} of shape {list(e.shape)}")
    r0 = pk.expert * rows + projs.index(pk.proj) * per
    return Side(name, View((ix.seg(fe, (r0, r0 + per)),)))
