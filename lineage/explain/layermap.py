"""Refiner: which parent layer each suspect layer came from, when not in order.

Alignment compares layer i with layer i. A suspect that dropped, duplicated
or reordered layers (a pruned model, a passthrough stack) then has layers
that match no namesake. For a `derived` verdict with a stack layer that has
no significant matrix, or an `inconclusive` one where a candidate matches
only part of the matrices, every suspect layer is compared with every
parent layer on the largest matrix roles they share (LAYERMAP_ROLES), on a
sample of rows (LAYERMAP_SAMPLE): those comparisons are ordinary fit work
items, run on the workers. Each suspect layer maps to the parent layer it
correlates with best, when significantly; a mapping that is not the
identity and covers every suspect layer is reported as `layer_map`, and
makes an inconclusive suspect `derived` from that candidate.
"""

from __future__ import annotations

import math

from lineage.align import Group, Index, Side
from lineage.explain.evidence import Evidence
from lineage.explain.thresholds import LAYERMAP_ROLES, LAYERMAP_SAMPLE, RELATED_FRAC, Z_SIG
from lineage.fit import single
from lineage.geometry import View
from lineage.layout import canonical, component, layer_index
from lineage.layout import role as role_of
from lineage.plan import Item
from lineage.source import Model


def roles(model: Model) -> dict[str, dict[int, str]]:
    """role (canonical name, layer index as '*') -> layer -> tensor name; matrices of the main stack."""
    out: dict[str, dict[int, str]] = {}
    for name, e in model.tensors.items():
        layer = layer_index(name)
        if layer is None or len(e.shape) < 2 or not e.dtype.startswith(("F", "BF")):
            continue
        out.setdefault(role_of(name), {})[layer] = name
    return out


def comparisons(suspect: Model, parent: Model) -> tuple[list[str], list[int], list[int], list[tuple[int, int, Group]]]:
    """(roles picked, suspect layers, parent layers, [(i, j, group)]): every pair of layers on every picked role."""
    rs, rp = roles(suspect), roles(parent)
    shared = []
    for role in rs.keys() & rp.keys():
        shapes = {suspect.tensors[n].shape for n in rs[role].values()} | {parent.tensors[n].shape for n in rp[role].values()}
        if len(shapes) == 1:
            shared.append((math.prod(next(iter(shapes))), role))
    if not shared:
        return [], [], [], []
    picked = [r for _, r in sorted(shared, reverse=True)[:LAYERMAP_ROLES]]
    s_ix, p_ix = Index.build(suspect), Index.build(parent)
    s_layers = sorted(set.intersection(*(set(rs[r]) for r in picked)))
    p_layers = sorted(set.intersection(*(set(rp[r]) for r in picked)))
    out = []
    for i in s_layers:
        for j in p_layers:
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
                out.append((i, j, g))
    return picked, s_layers, p_layers, out


def unmatched_layers(ev: Evidence, cand: str) -> bool:
    """Some stack layer has no matrix significantly correlated with `cand`."""
    sig: dict[int, bool] = {}
    for r in ev.matrices:
        if r.layer is None:
            continue
        c = r.cand(cand)
        z = c.z if c is not None and c.status == "ok" else None
        sig[r.layer] = sig.get(r.layer, False) or (z is not None and z >= Z_SIG)
    return not all(sig.values())


class LayerMap:
    name = "layer_map"
    refines = True

    def targets(self, ev: Evidence, verdict: dict) -> list[str]:
        if verdict["verdict"] == "derived":
            name = verdict["parents"][0]["name"]
            return [name] if unmatched_layers(ev, name) else []
        if verdict["verdict"] == "inconclusive":
            return [n for n in ev.names if 0 < ev.per[n].frac_significant < RELATED_FRAC]
        return []

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        if verdict is None or not ev.models:
            return []
        items = []
        for name in self.targets(ev, verdict):
            for _, _, g in comparisons(ev.models[ev.suspect], ev.models[name])[3]:
                items.append(Item(len(items), g, 0, g.view.rows, 0, 1, g.nbytes, LAYERMAP_SAMPLE))  # type: ignore[union-attr]
        return items

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        if verdict is None or not results:
            return None
        k = 0
        layers = {r.layer for r in ev.rows if r.layer is not None and r.ndim >= 2}
        for name in self.targets(ev, verdict):
            picked, s_layers, p_layers, pairs = comparisons(ev.models[ev.suspect], ev.models[name])
            scores: dict[int, dict[int, list]] = {}
            for i, j, _ in pairs:
                res = results[k]
                k += 1
                sg = single(res.stats, name) if res.stats is not None else None
                cell = scores.setdefault(i, {}).setdefault(j, [[], []])
                cell[0].append(sg.corr if sg else float("nan"))
                cell[1].append(sg.z if sg else float("nan"))
            mapping, corr = {}, {}
            for i in s_layers:
                sc = {j: (sum(c) / len(c), min(z)) for j, (c, z) in scores.get(i, {}).items()}
                if not sc:
                    continue
                best = max(sc, key=lambda j: sc[j][0])
                if sc[best][1] >= Z_SIG:
                    mapping[i], corr[i] = best, sc[best][0]
            if not mapping or all(i == j for i, j in mapping.items()) or set(mapping) != layers:
                continue
            verdict["layer_map"] = {str(i): j for i, j in sorted(mapping.items())}
            text = ", ".join(f"{i}->{j}" for i, j in sorted(mapping.items()))
            low = min(corr.values())
            if verdict["verdict"] == "inconclusive":
                verdict["verdict"], verdict["parents"] = "derived", [{"name": name, "weight": 1.0, "ci95": [1.0, 1.0]}]
                verdict["explanation"] = (
                    f"{ev.suspect} derives from {name} with its layers rearranged: every suspect layer matches one "
                    f"layer of {name} (suspect->parent {text}; correlation at least {low:.4f} on {', '.join(picked)}), "
                    "though few matrices match their namesakes."
                )
            else:
                verdict["explanation"] += f" Its layers map to {name}'s as {text} (correlation at least {low:.4f})."
            return verdict
        return None
