"""Refiners: experts renumbered (with their router rows) to hide a mixture of experts' origin.

`ExpertMatching` asks, for a suspect that is not already a copy or a blend,
up to EXPERT_CANDIDATES candidates with routers of the same shape (the
parent of a `derived` verdict first, then the most significant) for their
layers' expert matching (experts.ExpertMatchItem: the
routers only). A matching is kept when it is not the identity, and the
routers correlate at GAUGE_MIN_CORR or more once re-paired and by
GAUGE_MIN_GAIN more than before (the thresholds of the residual gauge,
explain/gauge.py, for the same question: does undoing the transform relate
what did not relate).

`ExpertRefit` then compares every expert matrix and router of those layers
again, the candidate's side re-paired by the matching (per-expert tensors
by their new number, fused ones and the router by row blocks: no byte is
moved, only which rows are read), as ordinary fit items on the workers,
and decides again on the evidence with those rows replaced. The matching
is adopted when that verdict ranks higher (a copy, a fine-tune, where it
was unrelated or inconclusive) or, for the same verdict, relates the parent
more closely; the verdict then names it (`experts`, `undone`).

`RouterShift` makes a `derived` suspect a copy when only its routers differ
from the parent's, each by one vector added to every row (no softmax
routing decision changes). `ExpertMatchingInGauge` matches the routers of a
candidate in the suspect's residual gauge once one is estimated (a rotated
and renumbered model), for the gauge's refit to re-pair the experts.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pyarrow as pa

from lineage.align import Group, Index, Side, _pair, align
from lineage.experts import ExpertMatch, ExpertMatchItem, experts_prefix, renumbered, reorder, router_name
from lineage.explain.evidence import Evidence
from lineage.explain.table import _rows_of
from lineage.explain.thresholds import GAUGE_MIN_CORR, GAUGE_MIN_GAIN
from lineage.geometry import View
from lineage.header import TensorEntry
from lineage.layout import fused_key, per_expert_key
from lineage.plan import Item
from lineage.rows import SCHEMA, tensor_row

#: Candidates whose routers are matched when the verdict names no parent (the most related
#: first; routers are small, and a pool's screened-out candidates count too).
EXPERT_CANDIDATES = 8
#: Largest fit item of the re-paired comparison (bytes, suspect and candidates).
REFIT_ITEM_BYTES = 256 << 20

MATCHES, MATCHES_IN_GAUGE, GROUPS = "experts.matches", "experts.matches in gauge", "experts.groups"
#: Every router matching of the plain comparison, kept or not (RouterShift reads them)
ROUTERS = "experts.routers"


def _routers(model) -> dict[str, object]:
    """Canonical experts prefix -> the router's entry, for the layers that have experts and a router."""
    ix = Index.build(model)
    prefixes = set(ix.expert_prefixes) | {p for p, _ in ix.fused}
    return {p: ix.by_name[router_name(p)] for p in sorted(prefixes) if router_name(p) in ix.by_name}


class ExpertMatching:
    name = "expert matching"
    refines = True

    def targets(self, ev: Evidence, verdict: dict | None) -> list[str]:
        if verdict is None or verdict["verdict"] in ("identical", "blend") or not ev.models:
            return []
        if verdict.get("layer_map"):
            return []
        # the parent first: a fine-tune with its experts renumbered; then the others, for a copy
        # of one of them that another candidate, numbered as the copy is, now looks closest to
        first = [verdict["parents"][0]["name"]] if verdict["verdict"] == "derived" else []
        ranked = sorted((n for n in ev.reps if n not in first), key=lambda n: -ev.per[n].frac_significant)
        return (first + ranked)[:EXPERT_CANDIDATES]

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        return match_items(ev, self.targets(ev, verdict))

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        return kept(ev, verdict, results, MATCHES)


def match_items(ev: Evidence, names: list[str], gauges: dict | None = None) -> list[ExpertMatchItem]:
    """Router matchings of the suspect's layers against each candidate in `names` (with `gauges`:
    the candidate brought into the suspect's residual gauge first, gains folded where it says)."""
    from lineage.explain.gauge import gain_view
    from lineage.gauge import folded_norm

    suspect = ev.models.get(ev.suspect)
    mine = _routers(suspect) if suspect is not None else {}
    if not mine:
        return []
    s_ix = Index.build(suspect)
    items: list[ExpertMatchItem] = []
    for n in names:
        m = ev.models.get(n)
        if m is None:
            continue
        c_ix = Index.build(m)
        gz = (gauges or {}).get(n)
        for prefix, theirs in _routers(m).items():
            se = mine.get(prefix)
            if se is None or se.shape != theirs.shape or len(se.shape) != 2:
                continue
            sv, cv = View((s_ix.seg(se),)), View((c_ix.seg(theirs),))
            gains = None
            if gz is not None and gz.fold:
                norm = folded_norm(router_name(prefix))
                gs, gc = (gain_view(s_ix, norm), gain_view(c_ix, norm)) if norm else (None, None)
                if gs is None or gc is None:
                    continue
                gains = (gs, gc)
            items.append(ExpertMatchItem(len(items), n, prefix, sv, cv, sv.nbytes + cv.nbytes, gz, gains))
    return items


def kept(ev: Evidence, verdict: dict | None, results: list, key: str) -> dict | None:
    """Keep (under memo `key`) the matchings that relate the routers: not the identity,
    GAUGE_MIN_CORR once re-paired and GAUGE_MIN_GAIN above the comparison by index."""
    found: dict[str, dict[str, ExpertMatch]] = ev.memo(key, dict)
    for r in results:
        if isinstance(r, str):
            verdict.setdefault("warnings", []).append(r)  # type: ignore[union-attr]
            continue
        if r is not None and key == MATCHES:
            ev.memo(ROUTERS, dict).setdefault(r.candidate, {})[r.prefix] = r
        if r is not None and not r.identity and r.corr_after >= GAUGE_MIN_CORR and r.corr_after - r.corr_before >= GAUGE_MIN_GAIN:
            found.setdefault(r.candidate, {})[r.prefix] = r
    return verdict


class ExpertRefit:
    name = "experts"
    refines = True

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        found: dict[str, dict[str, ExpertMatch]] = ev.memo(MATCHES, dict)
        if verdict is None or not found:
            return []
        suspect = ev.models[ev.suspect]
        cands = [ev.models[c.name] for c in ev.candidates if c.name in ev.models]
        groups, _ = align(suspect, cands)
        ixs = {m.name: Index.build(m) for m in cands}
        items: list[Item] = []
        planned: list[tuple[Group, list[int]]] = []
        for g in groups:
            if g.status != "ok":
                continue
            new = g
            for n, matches in found.items():  # every matched candidate's side re-paired by its own matching
                new = repaired(new, suspect.tensors[g.tensor], n, matches, ixs[n]) or new
            if new is g:
                continue
            rows = new.view.rows  # type: ignore[union-attr]
            parts = max(1, min(rows, math.ceil(new.nbytes / REFIT_ITEM_BYTES)))
            cuts = [rows * k // parts for k in range(parts + 1)]
            ids = []
            for k in range(parts):
                ids.append(len(items))
                items.append(Item(len(items), new, cuts[k], cuts[k + 1], k, parts, new.nbytes * (cuts[k + 1] - cuts[k]) // rows))
            planned.append((new, ids))
        ev.memo(GROUPS, lambda: planned)
        return items

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        from lineage.explain.gauge import EVIDENCE, RANK, explain

        if verdict is None or not results:
            return verdict
        rows = []
        for g, ids in ev.memo(GROUPS, list):
            parts = [results[i] for i in ids]
            err = next((p.error for p in parts if p.error), None)
            if err is not None or any(p.stats is None for p in parts):
                rows.append(tensor_row(g, None, err or "re-paired comparison failed"))
                continue
            st = parts[0].stats
            for p in parts[1:]:
                st = st.merge(p.stats)
            rows.append(tensor_row(g, st.fold() if len(parts) > 1 else st))
        stacks: dict = {}
        fresh = {r.tensor: r for r in _rows_of(pa.Table.from_pylist(rows, schema=SCHEMA), stacks)}
        for s in stacks.values():
            s.seal()
        ev2 = Evidence(ev.suspect, ev.candidates, [fresh.get(r.tensor, r) for r in ev.rows], dict(ev.unmatched), ev.models)
        v2 = explain(ev2)
        found: dict[str, dict[str, ExpertMatch]] = ev.memo(MATCHES, dict)
        parents = [p["name"] for p in v2["parents"] if p["name"] in found]
        lead = parents[0] if parents else None
        better = lead is not None and (
            RANK.get(v2["verdict"], 0) > RANK.get(verdict["verdict"], 0)
            or (
                v2["verdict"] == verdict["verdict"] != "unrelated"
                and (ev2.per[lead].median_corr or -1.0) > (ev.per[lead].median_corr or -1.0)
            )
        )
        section = {
            n: {
                "layers_renumbered": len(m),
                "experts": len(next(iter(m.values())).perm),
                "router_corr_before": round(min(x.corr_before for x in m.values()), 6),
                "router_corr_after": round(min(x.corr_after for x in m.values()), 6),
                "median_corr_before": ev.per[n].median_corr,
                "median_corr_after": ev2.per[n].median_corr,
                "adopted": better and n in parents,
            }
            for n, m in found.items()
        }
        if not better:
            verdict["experts"] = section
            return verdict
        layers = max(len(found[n]) for n in parents)
        who = " and ".join(parents)
        v2["explanation"] = (
            f"Against {who}, {ev.suspect} has its experts renumbered, the router's rows with them, in {layers} "
            f"layer{'s' if layers != 1 else ''} (which leaves the function unchanged); undone, "
            + v2["explanation"][0].lower()
            + v2["explanation"][1:]
        )
        v2["experts"] = section
        v2["undone"] = list(verdict.get("undone") or []) + ["experts renumbered"]
        for key in ("warnings", "layer_map"):
            if verdict.get(key) and key not in v2:
                v2[key] = verdict[key]
        ev.memo(EVIDENCE, lambda: ev2)
        return v2


class RouterShift:
    """A `derived` suspect that is the parent, its routers aside, within rounding, and whose
    routers equal the parent's (experts re-paired where they were renumbered) up to one vector
    added to every row, is a copy: a softmax router picks the same experts with the same
    weights after such a shift, so an evader may make one. `identical`, named in `undone`."""

    name = "router shift"
    refines = True

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        from lineage.explain.gauge import EVIDENCE
        from lineage.explain.permutation import derived_parent, identical_after

        name = derived_parent(verdict)
        routers = ev.memo(ROUTERS, dict).get(name, {})
        # the routers of the adopted matching, else those matched as they are numbered
        adopted = ((verdict or {}).get("experts") or {}).get(name, {}).get("adopted")
        shifted = {m.tensor: 0.0 for m in routers.values() if m.rel_centered <= m.tol and (m.identity or adopted)}
        if name is None or not shifted:
            return verdict
        worst = identical_after(ev.memo(EVIDENCE, lambda: ev), name, [Overrides(shifted)])
        if worst is None:
            return verdict
        largest = max(m.rel_centered for m in routers.values() if m.tensor in shifted)
        prior = list(verdict.get("undone") or [])
        with_prior = f" (with the {', '.join(prior)} undone)" if prior else ""
        verdict["verdict"] = "identical"
        verdict["undone"] = prior + ["router rows shifted"]
        verdict["explanation"] = (
            f"{ev.suspect} is a copy of {name} in disguise{with_prior}: the rows of {len(shifted)} "
            f"router{'s' if len(shifted) != 1 else ''} are shifted by one vector each (which changes no routing "
            f"decision); less their mean row they are within storage rounding of {name}'s (largest relative "
            f"distance {largest:.2g}), and every other tensor is within storage rounding (largest {worst:.2g})."
        )
        return verdict

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        return []


class Overrides:
    """Distances that explain/permutation.identical_after takes instead of the rows' (it reads
    `rel_after`, as on a permutation.Permutation; no tensors of its own were permuted)."""

    def __init__(self, rel_after: dict[str, float]) -> None:
        self.rel_after = rel_after
        self.tensors: list[str] = []


class ExpertMatchingInGauge:
    """The same matching once a residual gauge is estimated (explain/gauge.py): the router reads
    the residual stream, so a rotated model's routers are matched in the suspect's gauge, gains
    folded; GaugeRefit then compares the experts re-paired by it."""

    name = "expert matching in gauge"
    refines = True

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        from lineage.explain.gauge import GaugeRefit, prenorm

        if verdict is None or not ev.models:
            return []
        found = {n: e.gauge for n, e in GaugeRefit().accepted(ev).items() if not e.gauge.identity}
        suspect = ev.models[ev.suspect]
        gauges = {n: replace(g, fold=g.fold and prenorm(suspect) and prenorm(ev.models[n])) for n, g in found.items()}
        return match_items(ev, sorted(gauges), gauges)

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        return kept(ev, verdict, results, MATCHES_IN_GAUGE)


def repaired(g: Group, entry: TensorEntry, name: str, matches: dict[str, ExpertMatch], c_ix: Index) -> Group | None:
    """`g` (the suspect's tensor `entry`) with candidate `name`'s side re-paired by the expert
    matching of its layer; None when `g` is not an expert matrix or router of a matched layer."""
    prefix = experts_prefix(g.tensor)
    m = matches.get(prefix) if prefix is not None else None
    if m is None or g.view is None:
        return None
    sides = []
    for side in g.sides:
        if side.candidate != name:
            sides.append(side)
        elif per_expert_key(g.tensor) is not None:
            # the parent's matrix of the expert this one was renumbered from (per expert, or rows of a fused tensor)
            new = _pair(replace(entry, name=renumbered(g.tensor, m.perm)), c_ix, g.component)
            if new.view is None:
                return None
            sides.append(Side(name, new.view))
        elif side.view is not None and (fused_key(g.tensor) is not None or len(g.shape) == 2):
            sides.append(Side(name, reorder(side.view, m.perm)))
        else:
            return None  # a per-expert vector: left as it was compared
    return replace(g, sides=tuple(sides))
