"""Refiner: per-head and per-unit disguises seen through their invariant products (lineage/invariants.py).

For a `derived` suspect some of whose attention or MLP matrices correlate
with the parent far below the model's typical level (and were not
explained by a permutation), each layer holding such matrices becomes a
work item (invariants.InvariantItem): the worker reads the layer's q, k,
v, o, up and down of both models (gains folded, the parent in the
suspect's residual gauge when one was found), forms the invariant products
QK, OV and W_down W_up between a fixed probe, and returns their statistics.
They are judged against the permutation null, at INVARIANT_Z_SIG (its
spread between unrelated models is twice a plain matrix's); a kind whose
products are significant on at least half of the layers while its
direct matrices are not explains those matrices: the disguise (a per-head
Q/K transform, a V/O transform, MLP units rescaled or permuted) is named in `undone`,
and the `invariants` section reports per kind the layers, the median
correlation and z, and the largest relative distance. A suspect whose
other tensors are all within rounding of the parent, and whose invariant
products are within the rounding their two factors carry, is `identical`:
a copy in disguise.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from lineage.align import Index
from lineage.explain.base import one_parent
from lineage.explain.evidence import Evidence
from lineage.explain.gauge import EVIDENCE, RANK, adopted, explain, gain_view, prenorm
from lineage.explain.permutation import derived_parent, unmatched
from lineage.explain.thresholds import IDENTICAL_COVERAGE, INVARIANT_Z_SIG, RELATED_FRAC
from lineage.fit import single
from lineage.gauge import folded_norm
from lineage.geometry import View
from lineage.invariants import DISGUISE, KINDS, PARTS, InvariantItem
from lineage.layout import canonical, layer_prefix
from lineage.modelconfig import head_dim

#: A derived suspect with at least this fraction of its other tensors (embeddings, gates,
#: norms, heads) within rounding of the parent is a copy changed in places: all its changed
#: attention and MLP matrices are checked, not only the ones that no longer correlate.
MOSTLY_COPY = 0.5
#: A kind of disguise is seen through in a layer when its invariant product is at most this
#: fraction as far from the parent's as the closest of the matrices it is made of.
SEEN_RATIO = 0.25
#: Layers searched at most (each is one work item reading the layer's six matrices of both models).
MAX_INVARIANT_LAYERS = 512


def _part(name: str) -> str | None:
    c = canonical(name)
    return next((p for p, pat in PARTS.items() if pat.search(c)), None)


class Invariants:
    name = "invariants"
    refines = True

    def parent(self, verdict: dict | None) -> str | None:
        return derived_parent(verdict)

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        name = self.parent(verdict)
        if name is None or not ev.models or name not in ev.models:
            return []
        used = ev.memo(EVIDENCE, lambda: ev)
        permuted = {t for p in (verdict or {}).get("permutation", []) for t in p["tensors"]}
        if not self.suspicious(used, name, permuted):
            return []
        suspect, parent = ev.models[ev.suspect], ev.models[name]
        fold = prenorm(suspect) and prenorm(parent)
        hd = head_dim(suspect)[0] or head_dim(parent)[0]
        gauge = adopted(ev).get(name)
        s_ix, p_ix = Index.build(suspect), Index.build(parent)
        s_by_layer: dict[str, list[str]] = defaultdict(list)
        for t in suspect.tensors:
            pre = layer_prefix(t)
            if pre is not None and _part(t) is not None and t not in permuted:
                s_by_layer[pre].append(t)
        items = []
        for pre in sorted(s_by_layer)[:MAX_INVARIANT_LAYERS]:
            sides_s, sides_p, nbytes = [], [], 0
            for t in s_by_layer[pre]:
                part = _part(t)
                pe = p_ix.by_name.get(canonical(t))
                se = suspect.tensors[t]
                if pe is None or pe.shape != se.shape or len(se.shape) != 2:
                    continue
                norm = folded_norm(t) if fold and part in ("q", "k", "v", "up") else None
                sg, pg = (gain_view(s_ix, norm), gain_view(p_ix, norm)) if norm else (None, None)
                if norm and (sg is None or pg is None):
                    continue
                sides_s.append((part, View((s_ix.seg(se),)), sg))
                sides_p.append((part, View((p_ix.seg(pe),)), pg))
                nbytes += se.nbytes + pe.nbytes
            if sides_s:
                items.append(InvariantItem(len(items), pre, name, tuple(sides_s), tuple(sides_p), gauge, hd, nbytes))
        return items

    @staticmethod
    def suspicious(used: Evidence, name: str, permuted: set[str]) -> bool:
        """Worth reading the layers again: some attention or MLP matrix no longer correlates with the
        parent as the others do, or the suspect is a copy (its other tensors mostly within rounding)
        whose attention or MLP matrices changed."""
        if any(_part(t) is not None and t not in permuted for t in unmatched(used, name)):
            return True
        rows = [(r, c) for r in used.ok if (c := r.cand(name)) is not None and c.status == "ok"]
        within = [c.rel_dist is not None and c.rounding_tol is not None and c.rel_dist <= c.rounding_tol for _, c in rows]
        others = [ok for (r, _), ok in zip(rows, within) if _part(r.tensor) is None]
        changed = any(not ok and _part(r.tensor) is not None for (r, _), ok in zip(rows, within))
        return bool(others) and changed and sum(others) >= MOSTLY_COPY * len(others)

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        name = self.parent(verdict)
        if name is None or verdict is None or not results:
            return verdict
        used = ev.memo(EVIDENCE, lambda: ev)
        direct: dict[tuple[str, str], float] = {}  # (layer, part) -> the direct matrix's distance
        for row in used.ok:
            c, part, pre = row.cand(name), _part(row.tensor), layer_prefix(row.tensor)
            if c is not None and c.rel_dist is not None and part is not None and pre is not None:
                direct[(pre, part)] = c.rel_dist
        per: dict[str, list] = defaultdict(list)  # kind -> (layer, single fit, seen through here, within rounding)
        for r in results:
            if isinstance(r, str):
                verdict.setdefault("warnings", []).append(r)
                continue
            for kind, st in r.stats.items():
                sg = single(st, name)
                near = min((direct[(r.layer, p)] for p in KINDS[kind] if (r.layer, p) in direct), default=0.0)
                # a disguise leaves the products far closer than the matrices; a fine-tune moves both alike
                per[kind].append((r.layer, sg, sg.z >= INVARIANT_Z_SIG and sg.rel_dist < SEEN_RATIO * near, sg.rel_dist <= r.tol))
        section, seen = {}, []
        for kind, got in per.items():
            zs = [sg.z for _, sg, _, _ in got]
            through = sum(x for _, _, x, _ in got)
            section[kind] = {
                "layers": len(got),
                "median_corr": statistics.median(sg.corr for _, sg, _, _ in got),
                "median_z": statistics.median(zs),
                "frac_significant": sum(z >= INVARIANT_Z_SIG for z in zs) / len(zs),
                "max_rel_dist": max(sg.rel_dist for _, sg, _, _ in got),
                "layers_seen_through": through,
            }
            if through >= RELATED_FRAC * len(got):
                seen.append(kind)
        verdict["invariants"] = section
        if not seen:
            return verdict
        # the matrices a seen-through disguise changed, and the layers whose products agree to rounding
        hidden = {(pre, p) for k in seen for pre, _, x, _ in per[k] if x for p in KINDS[k]}
        exact = {(pre, k) for k in seen for pre, _, _, w in per[k] if w}
        names = [DISGUISE[k] for k in seen]
        prior = list(verdict.get("undone") or [])
        corr = ", ".join(f"{k.upper()} {section[k]['median_corr']:.4f}" for k in seen)
        said = (
            f" Its {', '.join(names)} (which leave the function unchanged) are seen through: the invariant "
            f"products agree with {name}'s (median correlation {corr})."
        )
        if prior:
            said = f" With the {', '.join(prior)} undone, its" + said[len(" Its") :]
        worst = identical_after(used, name, seen, hidden, exact)
        if worst is not None:
            verdict.update(verdict="identical", parents=one_parent(ev, name), undone=prior + names)
            verdict["explanation"] = (
                f"{ev.suspect} is a copy of {name} in disguise:{said} Every other tensor is within storage rounding "
                f"of {name}'s (largest relative distance {worst:.2g}), and every invariant product within the rounding "
                "of its two factors."
            )
            return verdict
        # the weights of a blend are in the matrices the disguise left alone: decide again on those
        kept = [r for r in used.rows if (layer_prefix(r.tensor), _part(r.tensor)) not in hidden]
        ev3 = Evidence(ev.suspect, ev.candidates, kept, dict(ev.unmatched), ev.models)
        v3 = explain(ev3)
        if RANK.get(v3["verdict"], 0) > RANK.get(verdict["verdict"], 0):
            left = len(used.rows) - len(kept)
            v3["explanation"] = (
                v3["explanation"]
                + said
                + f" The weights come from the {len(ev3.matrices)} matrices the disguise left alone ({left} set aside)."
            )
            for key in ("gauge", "permutation", "warnings"):
                if key in verdict:
                    v3[key] = verdict[key]
            v3["invariants"], v3["undone"] = section, prior + names
            return v3
        verdict["undone"] = prior + names
        verdict["explanation"] += said
        return verdict


def identical_after(used: Evidence, parent: str, seen: list[str], hidden: set, exact: set) -> float | None:
    """The largest relative distance to `parent` of the tensors the disguise did not touch, when
    they are all within rounding and every changed matrix belongs to a layer whose invariant
    product agrees within rounding; else None."""
    if used.per[parent].coverage < IDENTICAL_COVERAGE:
        return None
    worst = 0.0
    for r in used.rows:
        if r.status == "skipped" and r.reason.endswith("is not a weight"):
            continue
        c = r.cand(parent)
        if r.status != "ok" or c is None or c.status != "ok" or c.rounding_tol is None or c.rel_dist is None:
            return None
        if c.rel_dist <= c.rounding_tol:
            worst = max(worst, c.rel_dist)
            continue
        part, pre = _part(r.tensor), layer_prefix(r.tensor)
        kind = next((k for k in seen if part in KINDS[k]), None)
        if kind is None or (pre, part) not in hidden or (pre, kind) not in exact:
            return None
    return worst
