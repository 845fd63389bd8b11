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
from collections import Counter

from lineage.align import Group, Index, Side
from lineage.dtypes import rounding_tolerance
from lineage.explain.base import document
from lineage.explain.evidence import Evidence
from lineage.explain.thresholds import (
    LAYERMAP_CANDIDATES,
    LAYERMAP_ROLES,
    LAYERMAP_SAMPLE,
    PASSTHROUGH_MIN_SHARE,
    RELATED_FRAC,
    Z_SIG,
)
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


def unpaired_layers(ev: Evidence) -> bool:
    """The suspect has stack layers that no candidate has (a deeper stack: repeated layers)."""
    return any(r.layer is not None and r.ndim >= 2 and r.status != "ok" for r in ev.rows)


class LayerMap:
    name = "layer_map"
    refines = True

    def targets(self, ev: Evidence, verdict: dict) -> list[str]:
        """Candidates to compare every layer with: the parent first, then the others that might supply layers."""
        if verdict["verdict"] == "derived":
            name = verdict["parents"][0]["name"]
            if not (unmatched_layers(ev, name) or unpaired_layers(ev)):
                return []
            others = sorted((n for n in ev.reps if n != name), key=lambda n: -ev.per[n].frac_significant)
            return [name, *others[: LAYERMAP_CANDIDATES - 1]]
        if verdict["verdict"] == "inconclusive":
            partial = [n for n in ev.reps if 0 < ev.per[n].frac_significant < RELATED_FRAC]
            return sorted(partial, key=lambda n: -ev.per[n].frac_significant)[:LAYERMAP_CANDIDATES]
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
        targets = self.targets(ev, verdict)
        layers = {r.layer for r in ev.rows if r.layer is not None and r.ndim >= 2}
        # suspect layer -> (candidate, layer) -> ([corr], [z], every matrix within rounding)
        scores: dict[int, dict[tuple[str, int], list]] = {}
        picked_roles: dict[str, list[str]] = {}
        k = 0
        for name in targets:
            suspect, parent = ev.models[ev.suspect], ev.models[name]
            picked, _, _, pairs = comparisons(suspect, parent)
            picked_roles[name] = picked
            for i, j, g in pairs:
                res = results[k]
                k += 1
                sg = single(res.stats, name) if res.stats is not None else None
                pdt = parent.tensors[roles(parent)[role_of(g.tensor)][j]].dtype
                tol = rounding_tolerance(g.dtype, pdt)
                cell = scores.setdefault(i, {}).setdefault((name, j), [[], [], True])
                cell[0].append(sg.corr if sg else float("nan"))
                cell[1].append(sg.z if sg else float("nan"))
                cell[2] = cell[2] and sg is not None and tol is not None and sg.rel_dist <= tol
        best: dict[int, tuple[str, int, float, bool]] = {}
        for i, cells in scores.items():
            ok = {key: (sum(c) / len(c), copy) for key, (c, z, copy) in cells.items() if min(z) >= Z_SIG}
            if ok:
                key = max(ok, key=lambda key: (ok[key][1], ok[key][0]))
                best[i] = (key[0], key[1], *ok[key])
        if not best or set(best) != layers:
            return None
        sources = {src for src, *_ in best.values()}
        if len(sources) >= 2:
            return self.stack(ev, verdict, best)
        (name,) = sources
        mapping = {i: j for i, (_, j, _, _) in best.items()}
        if all(i == j for i, j in mapping.items()):
            return None
        verdict["layer_map"] = {str(i): j for i, j in sorted(mapping.items())}
        verdict["layer_map_copies"] = all(copy for *_, copy in best.values())
        text = ", ".join(f"{i}->{j}" for i, j in sorted(mapping.items()))
        low = min(c for _, _, c, _ in best.values())
        repeated = sorted({j for j in mapping.values() if list(mapping.values()).count(j) > 1})
        copies = all(copy for *_, copy in best.values())
        how = (f"; layers {', '.join(map(str, repeated))} of {name} appear more than once" if repeated else "") + (
            "; every layer is a copy of the one it maps to, within storage rounding" if copies else ""
        )
        if verdict["verdict"] == "inconclusive" or verdict["parents"][0]["name"] != name:
            verdict["verdict"], verdict["parents"] = "derived", [{"name": name, "weight": 1.0, "ci95": [1.0, 1.0]}]
            verdict["explanation"] = (
                f"{ev.suspect} derives from {name} with its layers rearranged: every suspect layer matches one "
                f"layer of {name} (suspect->parent {text}; correlation at least {low:.4f} on "
                f"{', '.join(picked_roles[name])}){how}, though few matrices match their namesakes."
            )
        else:
            verdict["explanation"] += f" Its layers map to {name}'s as {text} (correlation at least {low:.4f}){how}."
        return verdict

    def stack(self, ev: Evidence, verdict: dict, best: dict[int, tuple[str, int, float, bool]]) -> dict | None:
        """Layers taken whole from two or more candidates, in any order and with repeats: a passthrough merge."""
        if not all(copy for *_, copy in best.values()):
            return None  # layers that are not copies are mapped to one parent, or not at all
        shares = Counter(src for src, *_ in best.values())
        if sum(1 for v in shares.values() if v / len(best) >= PASSTHROUGH_MIN_SHARE) < 2:
            return None
        sources = {str(i): {"model": src, "layer": j} for i, (src, j, _, _) in sorted(best.items())}
        parents = [
            {"name": n, "weight": round(c / len(best), 6), "ci95": [round(c / len(best), 6)] * 2} for n, c in shares.most_common()
        ]
        text = ", ".join(f"{i}: {s['model']} {s['layer']}" for i, s in sources.items())
        out = document(
            ev,
            "blend",
            parents,
            f"{ev.suspect} is a layer stack (passthrough merge) of {len(best)} layers, each a copy within storage "
            f"rounding of one layer of {' or '.join(shares)} (suspect layer: source layer; {text}); weights are the "
            "share of layers each supplies.",
            method="passthrough",
            layer_sources=sources,
        )
        out["evidence"]["layer_stack"] = {"compared_with": sorted(shares), "sample_fraction": LAYERMAP_SAMPLE}
        return out
