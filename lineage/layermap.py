"""Which parent layer each suspect layer came from, when they are not in order.

Alignment compares layer i with layer i. A suspect that dropped, duplicated
or reordered layers (a pruned model, a passthrough stack) then shows layers
that do not match their namesakes. This compares every suspect layer with
every parent layer on the largest matrix roles they share (q_proj, ...),
reading a deterministic sample of rows, and maps each suspect layer to the
parent layer it correlates with best, when that correlation is significant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lineage.align import Group, Index, Side
from lineage.fit import single
from lineage.layout import canonical, component, layer_index
from lineage.layout import role as role_of
from lineage.source import Model
from lineage.stats import accumulate
from lineage.views import Reader, View

Z_SIG = 6.0


@dataclass
class LayerMap:
    mapping: dict[int, int]  # suspect layer -> parent layer
    corr: dict[int, float]  # correlation of each mapped pair
    roles: list[str]

    @property
    def is_identity(self) -> bool:
        return all(i == j for i, j in self.mapping.items())


def roles(model: Model) -> dict[str, dict[int, str]]:
    """role (canonical name, layer index as '*') -> layer -> tensor name; matrices of the main stack."""
    out: dict[str, dict[int, str]] = {}
    for name, e in model.tensors.items():
        layer = layer_index(name)
        if layer is None or len(e.shape) < 2 or not e.dtype.startswith(("F", "BF")):
            continue
        out.setdefault(role_of(name), {})[layer] = name
    return out


def map_layers(
    suspect: Model, parent: Model, reader: Reader, sample_fraction: float = 0.05, max_roles: int = 2
) -> LayerMap | None:
    """Best parent layer for each suspect layer (None when no role is shared)."""
    rs, rp = roles(suspect), roles(parent)
    shared = []
    for role in rs.keys() & rp.keys():
        shapes = {suspect.tensors[n].shape for n in rs[role].values()} | {parent.tensors[n].shape for n in rp[role].values()}
        if len(shapes) == 1:
            shared.append((math.prod(next(iter(shapes))), role))
    if not shared:
        return None
    picked = [r for _, r in sorted(shared, reverse=True)[:max_roles]]
    s_ix, p_ix = Index.build(suspect), Index.build(parent)
    s_layers = sorted(set.intersection(*(set(rs[r]) for r in picked)))
    p_layers = sorted(set.intersection(*(set(rp[r]) for r in picked)))
    mapping, corr = {}, {}
    for i in s_layers:
        scores = {}
        for j in p_layers:
            zs, cs = [], []
            for role in picked:
                se, pe = suspect.tensors[rs[role][i]], parent.tensors[rp[role][j]]
                g = Group(
                    suspect.name,
                    se.name,
                    canonical(se.name),
                    component(se.name),
                    i,
                    se.shape,
                    se.dtype,
                    View((s_ix.seg(se),)),
                    (Side(parent.name, View((p_ix.seg(pe),))),),
                )
                st = accumulate(g, reader, 16 << 20, sample_fraction=sample_fraction)
                sg = single(st, parent.name)
                cs.append(sg.corr)
                zs.append(sg.z)
            scores[j] = (sum(cs) / len(cs), min(zs))
        best = max(scores, key=lambda j: scores[j][0])
        if scores[best][1] >= Z_SIG:
            mapping[i], corr[i] = best, scores[best][0]
    return LayerMap(mapping, corr, picked)
