"""Refiner: MLP units and attention heads permuted to hide a model's origin.

For a `derived` suspect (without a layer map) whose matrices correlate with
the parent far below what its matched matrices reach (UNMATCHED_CORR of the
TYPICAL_CORR_QUANTILE correlation: permuted rows keep column structure, so
a permuted matrix can still be "significant" on its own), the matrices are
grouped by layer and by what can be permuted (MLP units; attention heads,
query rows with output columns; key/value heads), and each group becomes a
work item (unpermute.PermutationItem) that a worker runs. The head size
comes from config.json (modelconfig.head_dim); without a usable one, heads
are not searched and the verdict says why. Each permutation found is
reported under `permutation` with the correlation it restores, and named in
`undone`. When, undone (biases included), every tensor is within storage
rounding of the parent, the suspect is a disguised copy: `identical`.
"""

from __future__ import annotations

import math
import re

from lineage.align import Index
from lineage.experts import experts_prefix, renumbered
from lineage.explain.evidence import Evidence
from lineage.explain.experts import MATCHES, Overrides
from lineage.explain.thresholds import (
    IDENTICAL_COVERAGE,
    MAX_PERMUTATION_ELEMENTS,
    MAX_PERMUTATION_SEARCH,
    RELATED_FRAC,
    TYPICAL_CORR_QUANTILE,
    UNMATCHED_CORR,
    Z_SIG,
)
from lineage.geometry import View
from lineage.layout import canonical, layer_prefix, per_expert_key
from lineage.modelconfig import head_dim
from lineage.unpermute import Permutation, PermutationItem

#: Matrices whose rows are an MLP's hidden units, and those whose columns are.
UNIT_ROWS = re.compile(r"(mlp\.(gate_proj|up_proj|w1|w3|fc1)|intermediate\.dense)\.weight$")
UNIT_COLS = re.compile(r"(mlp\.(down_proj|w2|fc2)|(?<!attention\.)output\.dense)\.weight$")
ATTN_Q = re.compile(r"(self_attn\.q_proj|attention\.self\.query)\.weight$")
ATTN_KV = re.compile(r"(self_attn\.(k_proj|v_proj)|attention\.self\.(key|value))\.weight$")
ATTN_O = re.compile(r"(self_attn\.o_proj|attention\.output\.dense)\.weight$")
#: A mixture of experts' MLPs: each routed expert (units permuted within it) and the shared expert.
EXPERT_UNITS = re.compile(r"(experts\.\d+\.|shared_experts?\.)(gate_proj|up_proj|w1|w3|down_proj|w2)\.weight$")


def classify(name: str) -> tuple[str, str, str] | None:
    """(layer prefix, permutation group, 'rows'|'cols') of a matrix whose units can be permuted."""
    c = canonical(name)
    p = layer_prefix(name)
    if p is None:
        return None
    if m := EXPERT_UNITS.search(c):
        return c[: m.end(1)], "mlp units", "cols" if m.group(2) in ("down_proj", "w2") else "rows"
    if UNIT_ROWS.search(c):
        return p, "mlp units", "rows"
    if UNIT_COLS.search(c):
        return p, "mlp units", "cols"
    if ATTN_Q.search(c):
        return p, "attention heads", "rows"
    if ATTN_O.search(c):
        return p, "attention heads", "cols"
    if ATTN_KV.search(c):
        return p, "key/value heads", "rows"
    return None


def unmatched(ev: Evidence, parent: str) -> list[str]:
    """Suspect matrices that correlate with `parent` far below its typical matched level."""
    corr, sig = {}, []
    for r in ev.matrices:
        if r.ndim != 2:
            continue
        c = r.cand(parent)
        if c is not None and c.status == "ok":
            corr[r.tensor] = c.corr or 0.0
            if (c.z or 0.0) >= Z_SIG:
                sig.append(corr[r.tensor])
    # the level the significant matrices reach: in a mixture of experts whose experts' units are
    # permuted, nearly every matrix is disguised, and a quantile over all of them would be one of those
    typical = typical_corr(sig)
    return [t for t, c in corr.items() if c < UNMATCHED_CORR * typical][:MAX_PERMUTATION_SEARCH]


def typical_corr(corrs) -> float:
    """The TYPICAL_CORR_QUANTILE of the matrices' correlations: the level matched matrices reach."""
    ranked = sorted(corrs)
    return ranked[int(TYPICAL_CORR_QUANTILE * (len(ranked) - 1))] if ranked else 0.0


def derived_parent(verdict: dict | None) -> str | None:
    """The parent of a `derived` verdict without a layer map: what a refiner looks at units against."""
    if verdict is None or verdict["verdict"] != "derived" or verdict.get("layer_map"):
        return None
    return verdict["parents"][0]["name"]


class Permutations:
    name = "permutation"
    refines = True

    def parent(self, verdict: dict | None, ev: Evidence | None = None) -> str | None:
        """A derived verdict's parent; for an inconclusive one, the candidate related on most (but
        fewer than half) of the matrices: a mixture of experts whose experts' units are permuted
        keeps little else by name."""
        name = derived_parent(verdict)
        if name is None and ev is not None and verdict is not None and verdict["verdict"] == "inconclusive":
            partial = [n for n in ev.reps if 0 < ev.per[n].frac_significant < RELATED_FRAC]
            name = max(partial, key=lambda n: ev.per[n].frac_significant, default=None)
        return name

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        name = self.parent(verdict, ev)
        if name is None or not ev.models:
            return []
        return self.plan(ev, ev, name)

    def plan(self, ev: Evidence, used: Evidence, name: str, gauge=None, fold: bool = False) -> list:
        """Permutation searches for the matrices of `used` (the evidence compared) that do not
        match `name`; with a residual `gauge` (and `fold`), the parent is first brought into it."""
        from lineage.explain.gauge import gain_view
        from lineage.gauge import folded_norm

        suspect, parent = ev.models[ev.suspect], ev.models[name]
        groups: dict[tuple[str, str], dict[str, str]] = {}
        for t in unmatched(used, name):
            k = classify(t)
            if k is not None:
                groups.setdefault((k[0], k[1]), {})[t] = k[2]
        hd, why = head_dim(suspect)
        if hd is None:
            hd, why2 = head_dim(parent)
            why = why or why2
        if hd is None and why and any(w != "mlp units" for _, w in groups):
            ev.warnings.append(f"attention heads not searched for permutations: {why}")
        s_ix, p_ix = Index.build(suspect), Index.build(parent)
        renum = ev.memo(MATCHES, dict).get(name, {})  # experts renumbered (explain/experts.py): their parents
        items: list[PermutationItem] = []
        for (_, what), tensors in sorted(groups.items()):
            unit = 1 if what == "mlp units" else hd
            mats = []
            for t, kind in tensors.items():
                m = renum.get(experts_prefix(t) or "") if per_expert_key(t) is not None else None
                se, pe = suspect.tensors[t], p_ix.by_name.get(canonical(renumbered(t, m.perm) if m else t))
                if pe is None or pe.shape != se.shape or len(se.shape) != 2 or math.prod(se.shape) > MAX_PERMUTATION_ELEMENTS:
                    continue
                mats.append((t, View((s_ix.seg(se),)), View((p_ix.seg(pe),)), kind))
                bias = t[: -len("weight")] + "bias" if kind == "rows" and t.endswith(".weight") else None
                sb = suspect.tensors.get(bias) if bias else None
                pb = p_ix.by_name.get(canonical(bias)) if bias else None
                if sb is not None and pb is not None and sb.shape == pb.shape == (se.shape[0],):
                    mats.append((sb.name, View((s_ix.seg(sb),)), View((p_ix.seg(pb),)), "vec"))
            if mats and unit is not None:
                nbytes = sum(sv.nbytes + pv.nbytes for _, sv, pv, _ in mats)
                gains = []
                for t, _, _, kind in mats:
                    norm = folded_norm(t) if fold and kind == "rows" else None
                    gs, gp = (gain_view(s_ix, norm), gain_view(p_ix, norm)) if norm else (None, None)
                    if gs is not None and gp is not None:
                        gains.append((t, gs, gp))
                items.append(PermutationItem(len(items), what, unit, tuple(mats), nbytes, gauge, tuple(gains)))
        return items

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        name = self.parent(verdict, ev)
        if name is None or verdict is None:
            return None
        return self.amend(ev, ev, verdict, name, results)

    def amend(self, ev: Evidence, used: Evidence, verdict: dict, name: str, results: list) -> dict:
        """`verdict` with the permutations found named (and `identical` when, undone, every tensor
        of `used` is within rounding of the parent)."""
        if ev.warnings:
            verdict.setdefault("warnings", []).extend(ev.warnings)
        found = [p for p in results if p is not None]
        if not found:
            return verdict
        verdict["permutation"] = [
            {
                "what": p.what,
                "tensors": p.tensors,
                "units": p.units,
                "corr_before": round(p.corr_before, 6),
                "corr_after": round(p.corr_after, 6),
            }
            for p in found
        ]
        explained = sum(len(p.tensors) for p in found)
        kinds = " and ".join(sorted({p.what for p in found}))
        undone = f"{explained} of its matrices had their {kinds} permuted ({len(found)} groups; an evasion that leaves the function unchanged)"
        corr = (
            f"undone, they correlate with {name} at {min(p.corr_after for p in found):.4f} or more (before: "
            f"{max(p.corr_before for p in found):.4f} at most)"
        )
        prior = list(verdict.get("undone") or [])
        verdict["undone"] = prior + [f"{w} permutation" for w in sorted({p.what for p in found})]
        renum = ev.memo(MATCHES, dict).get(name, {})
        if renum and any(per_expert_key(t) is not None for p in found for t in p.tensors):
            # units searched in experts re-paired by the router matching: their routers re-paired too
            found = [*found, Overrides({m.tensor: m.rel_centered for m in renum.values()})]
            if "experts renumbered" not in verdict["undone"]:
                verdict["undone"].append("experts renumbered")
        worst = identical_after(used, name, found)
        if worst is not None:
            verdict["verdict"] = "identical"
            if not verdict.get("parents"):  # it was inconclusive: the parent is named now
                from lineage.explain.base import components, one_parent

                verdict["parents"] = one_parent(used, name)
                verdict["components"], layers = components(used, verdict["parents"])
                if layers:
                    verdict["layers"] = layers
            lead = f" (with the {', '.join(prior)} undone)" if prior else ""
            verdict["explanation"] = (
                f"{ev.suspect} is a copy of {name} in disguise{lead}: {undone}; {corr}, and every tensor is then within "
                f"storage rounding of {name}'s (largest relative distance {worst:.2g})."
            )
            return verdict
        if verdict["verdict"] == "inconclusive" and related_after(used, name, found):
            from lineage.explain.base import components, one_parent

            verdict["verdict"] = "derived"
            verdict["parents"] = one_parent(used, name)
            verdict["components"], layers = components(used, verdict["parents"])
            if layers:
                verdict["layers"] = layers
            verdict["explanation"] = (
                f"{ev.suspect} derives from {name} in disguise: {undone}; {corr}, as its other matrices do, so that "
                f"at least {RELATED_FRAC:.0%} of its matrices relate to {name}; beyond storage rounding."
            )
            return verdict
        verdict["explanation"] += f" {undone[0].upper()}{undone[1:]}; {corr}."
        return verdict


def related_after(ev: Evidence, parent: str, found: list) -> bool:
    """Whether, the permutations undone, at least RELATED_FRAC of the suspect's matrices relate to
    `parent`: significant as they are, or searched and matching, once undone, at the level the
    significant ones reach (UNMATCHED_CORR of their typical correlation)."""
    mats = {r.tensor: r.cand(parent) for r in ev.matrices if r.ndim >= 2}
    mats = {t: c for t, c in mats.items() if c is not None and c.status == "ok"}
    sig = {t for t, c in mats.items() if (c.z or 0.0) >= Z_SIG}
    typical = typical_corr(c.corr or 0.0 for t, c in mats.items() if t in sig)
    fixed = {t for p in found for t in p.tensors if isinstance(p, Permutation) and p.corr_after >= UNMATCHED_CORR * typical}
    return bool(mats) and len(sig | (fixed & set(mats))) >= RELATED_FRAC * len(mats)


def identical_after(ev: Evidence, parent: str, found: list) -> float | None:
    """The largest relative distance to `parent` once the permutations are undone, when every
    tensor is then within storage rounding (and enough of the suspect was compared); else None."""
    after = {t: rel for p in found for t, rel in (p.rel_after or {}).items()}
    if ev.per[parent].coverage < IDENTICAL_COVERAGE:
        return None
    worst = 0.0
    for r in ev.rows:
        if r.status == "skipped" and r.reason.endswith("is not a weight"):
            continue
        c = r.cand(parent)
        if r.status != "ok" or c is None or c.status != "ok" or c.rounding_tol is None or c.rel_dist is None:
            return None
        rel = after.get(r.tensor, c.rel_dist)
        if rel > c.rounding_tol:
            return None
        worst = max(worst, rel)
    return worst


class PermutationsInGauge(Permutations):
    """The same search once a residual gauge was adopted (explain/gauge.py): on the matrices
    refitted in it, the parent brought into the suspect's gauge first (and gains folded), as
    undoing a permuted hidden dimension or a rotation leaves permuted units and heads as they were."""

    name = "permutation in gauge"

    def parent(self, verdict: dict | None, ev: Evidence | None = None) -> str | None:
        name = super().parent(verdict)
        return name if name is not None and verdict is not None and verdict.get("gauge") else None

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        from lineage.explain.gauge import EVIDENCE, adopted, prenorm

        name = self.parent(verdict)
        gz = adopted(ev).get(name) if name is not None else None
        if name is None or gz is None or not ev.models:
            return []
        fold = prenorm(ev.models[ev.suspect]) and prenorm(ev.models[name])
        return self.plan(ev, ev.memo(EVIDENCE, lambda: ev), name, gz, fold)

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        from lineage.explain.gauge import EVIDENCE

        name = self.parent(verdict)
        if name is None or verdict is None or not results:
            return verdict
        return self.amend(ev, ev.memo(EVIDENCE, lambda: ev), verdict, name, results)
