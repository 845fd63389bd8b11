"""Refiner: a residual stream permuted or rotated to hide a model's origin (lineage/gauge.py).

When a candidate with the suspect's hidden size is not related to it (the
whole verdict unrelated or inconclusive, or a candidate left out of a
related verdict), `GaugeEstimate` asks a worker for the orthogonal
transform that best maps the candidate's embedding rows onto the
suspect's (gauge_work.EstimateItem: a bounded sample of rows). An
unrelated model's embedding can be rotated to fit part of another's
(GAUGE_MIN_CORR is far above that); a disguised copy's fits to rounding.
`GaugeRefit` then refits every matrix with each such candidate brought
into the suspect's gauge (norm gains folded first where the model is
pre-norm), as work items, and decides again on those rows with the same
explanations. The transform was fitted to the embedding only; every other
matrix is an independent check of it, so the permutation null and the
"half the matrices significant" rule keep unrelated models unrelated
(under a rotation the embedding row itself is left out). If the suspect is
then related, and more than before, that verdict is adopted with a
`gauge` section (what was looked for, what was found, how close to a
permutation or the identity, the correlation before and after) and the
disguise named in `undone`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from lineage.align import Index, align
from lineage.dtypes import DTYPES, MIXED
from lineage.explain.evidence import Evidence
from lineage.explain.experts import MATCHES_IN_GAUGE, repaired
from lineage.explain.table import _rows_of
from lineage.explain.thresholds import GAUGE_MIN_CORR, GAUGE_MIN_GAIN
from lineage.gauge import OFFSET_GAIN_TYPES, Gain, folded_norm, role
from lineage.gauge_work import MAX_GAUGE_HIDDEN, MAX_GAUGE_ROWS, EstimateItem, RefitItem
from lineage.geometry import View
from lineage.layout import canonical
from lineage.modelconfig import read_config
from lineage.rows import SCHEMA, tensor_row
from lineage.tokens import read_vocab, reordered, shared_rows

MEMO, GROUPS = "gauge estimates", "gauge groups"
#: Memo keys other refiners read: the evidence refitted in the adopted gauge, and the adopted transforms.
EVIDENCE, ADOPTED, VOCAB = "gauge evidence", "gauge adopted", "gauge vocabularies"
RANK = {"unrelated": 0, "inconclusive": 0, "derived": 1, "blend": 2, "identical": 3}


def prenorm(model) -> bool:
    """RMSNorm without biases, each norm read by matrices (Llama, Qwen, Mistral, Gemma 1): gains
    fold, rotations are allowed. Not LayerNorm (its mean subtraction), and not the sandwich norms
    of Gemma 2 and 3, whose norm of the attention output feeds the residual stream directly:
    there only a permutation of the hidden dimension keeps the function."""
    norms = [n for n in model.tensors if role(n) == "norm"]
    if not norms or any(n.endswith(".bias") for n in norms):
        return False
    return not any("feedforward_layernorm" in n for n in norms)


def embedding(model) -> str | None:
    return next((n for n in sorted(model.tensors) if role(n) == "embed" and len(model.tensors[n].shape) == 2), None)


def _view(model, name: str) -> View:
    ix = Index.build(model)
    return View((ix.seg(model.tensors[name]),))


class GaugeEstimate:
    name = "gauge estimate"
    refines = True

    def targets(self, ev: Evidence, verdict: dict | None) -> list[str]:
        """Candidates a disguise could hide: same hidden size, and not related to the suspect or
        with their vocabulary in another order (tokens.py)."""
        if verdict is None or verdict["verdict"] == "identical" or not ev.models:
            return []
        suspect = ev.models.get(ev.suspect)
        se = embedding(suspect) if suspect is not None else None
        if se is None:
            return []
        parents = {p["name"] for p in verdict.get("parents", [])}
        maps = vocab_maps(ev)
        out = []
        for n in ev.reps:
            m = ev.models.get(n)
            ce = embedding(m) if m is not None else None
            if ce is None or ((n in parents or n in ev.related) and n not in maps):
                continue
            hidden = suspect.tensors[se].shape[1]
            if m.tensors[ce].shape[1] == hidden:
                if hidden > MAX_GAUGE_HIDDEN:
                    ev.warnings.append(f"residual gauge not estimated: hidden size {hidden} above {MAX_GAUGE_HIDDEN}")
                    return []
                out.append(n)
        return out

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        names = self.targets(ev, verdict)
        if not names:
            return []
        suspect = ev.models[ev.suspect]
        se = embedding(suspect)
        sv = _view(suspect, se)
        maps = vocab_maps(ev)
        items = []
        for n in names:
            m = ev.models[n]
            cv = _view(m, embedding(m))
            fold = prenorm(suspect) and prenorm(m)
            pairs = None
            if n in maps:
                si, ci = maps[n]
                pick = np.unique(np.linspace(0, len(si) - 1, min(MAX_GAUGE_ROWS, len(si))).astype(np.int64))
                pairs = (si[pick], ci[pick])
            rows = min(sv.rows, cv.rows) if pairs is None else len(pairs[0])
            nbytes = rows * (sv.cols * 4 + cv.cols * 4)
            items.append(EstimateItem(len(items), n, sv, cv, fold, nbytes, pairs))
        return items

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        if verdict is not None:
            for w in ev.warnings:
                if w not in verdict.get("warnings", []):
                    verdict.setdefault("warnings", []).append(w)
        for r in results:
            if isinstance(r, str):
                verdict.setdefault("warnings", []).append(r)  # type: ignore[union-attr]
            else:
                ev.memo(MEMO, dict)[r.candidate] = r
        return verdict


class GaugeRefit:
    name = "gauge"
    refines = True

    def accepted(self, ev: Evidence) -> dict:
        est = ev.memo(MEMO, dict)
        return {
            n: e
            for n, e in est.items()
            if e.corr_after >= GAUGE_MIN_CORR
            and e.corr_after - e.corr_before >= GAUGE_MIN_GAIN
            and (e.gauge.fold or e.gauge.perm is not None)
        }

    def requests(self, ev: Evidence, verdict: dict | None) -> list:
        found = self.accepted(ev)
        if verdict is None or not found:
            return []
        suspect = ev.models[ev.suspect]
        cands = [ev.models[c.name] for c in ev.candidates if c.name in ev.models]
        fold = all(e.gauge.fold for e in found.values()) and prenorm(suspect)
        rotation = any(e.gauge.perm is None for e in found.values())
        maps = {n: mp for n, mp in vocab_maps(ev).items() if n in found}
        ixs = {m.name: Index.build(m) for m in [suspect, *cands]}
        groups, _ = align(suspect, cands)
        items, planned = [], ev.memo(GROUPS, list)
        renumbered = {n: m for n, m in ev.memo(MATCHES_IN_GAUGE, dict).items() if n in found}
        for g in groups:
            r = role(g.tensor)
            if g.status != "ok" or g.view is None or r is None:
                continue
            for n, matches in renumbered.items():  # experts renumbered under the disguise: their rows re-paired
                g = repaired(g, suspect.tensors[g.tensor], n, matches, ixs[n]) or g
            if (r == "embed" and rotation) or (r == "norm" and fold):
                continue  # the transform was fitted to it / gains folded into their readers
            norm = folded_norm(g.tensor) if fold and r == "reads" else None
            s_gain = gain_view(ixs[suspect.name], norm) if norm else None
            if norm and s_gain is None:
                continue
            sides = []
            s_view = g.view
            for side in g.paired:
                c_gain = gain_view(ixs[side.candidate], norm) if norm else None
                if norm and c_gain is None:
                    break
                e = found.get(side.candidate)
                gz = e.gauge if e is not None and not e.gauge.identity else None
                sides.append((side.candidate, side.view, c_gain, gz))
            else:
                rows = None
                if maps and vocab_matrix(g.tensor):
                    # compared on the tokens every candidate shares with the suspect, row by token
                    s_view, sides, rows = token_rows(g, sides, maps, ixs)
                nbytes = g.nbytes
                items.append(RefitItem(len(items), g.tensor, r, s_view, s_gain, tuple(sides), nbytes, rows))
                planned.append(g)
        return items

    def apply(self, ev: Evidence, verdict: dict | None, results: list) -> dict | None:
        est = ev.memo(MEMO, dict)
        if verdict is None or not est:
            return verdict
        found = self.accepted(ev)
        section = {
            n: {
                "looked_for": "residual permutation or rotation" + (" (norm gains folded)" if e.gauge.fold else ""),
                "found": e.gauge.kind if n in found else None,
                "rows": e.rows,
                "embedding_corr_before": round(e.corr_before, 6),
                "embedding_corr_after": round(e.corr_after, 6),
                "from_identity": round(e.from_identity, 6),
                "from_permutation": round(e.from_permutation, 6),
            }
            for n, e in est.items()
        }
        for n, (si, _) in vocab_maps(ev).items():
            if n in section:
                section[n]["vocabulary"] = {"shared_tokens": len(si), "reordered": True}
        verdict["gauge"] = section
        if not results:
            return verdict
        groups = ev.memo(GROUPS, list)
        rows = []
        for g, r in zip(groups, results):
            if isinstance(r, str) or r is None:
                rows.append(tensor_row(g, None, r or "gauge refit failed"))
            else:
                rows.append(recomputed(tensor_row(g, r)))
        stacks: dict = {}
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        new_rows = _rows_of(table, stacks)
        for s in stacks.values():
            s.seal()
        ev2 = Evidence(ev.suspect, ev.candidates, new_rows, dict(ev.unmatched), ev.models)
        v2 = explain(ev2)
        for n in found:
            per = ev2.per.get(n)
            section[n]["median_corr_before"] = ev.per[n].median_corr
            section[n]["median_corr_after"] = per.median_corr if per else None
            section[n]["frac_significant_after"] = per.frac_significant if per else None
        related = [n for n in found if n in ev2.related]
        better = RANK.get(v2["verdict"], 0) > RANK.get(verdict["verdict"], 0) or (
            v2["verdict"] == verdict["verdict"] == "blend" and len(v2["parents"]) > len(verdict["parents"])
        )
        if not related or not better:
            for n in found:
                section[n]["found"] = None
                section[n]["rejected"] = "the other matrices do not relate in the transformed gauge"
            return verdict
        for n in found:
            if n not in related:
                section[n]["found"] = None
                section[n]["rejected"] = "the other matrices do not relate in the transformed gauge"
        kinds = sorted({found[n].gauge.kind for n in related} - {"identity"})
        rotated = any(found[n].gauge.perm is None for n in related)
        what = " / ".join(kinds) + (" (norm gains folded first)" if rotated else "")
        vocab = [n for n in related if n in vocab_maps(ev)]
        experts = {n: m for n, m in ev.memo(MATCHES_IN_GAUGE, dict).items() if n in related}
        undone = (["vocabulary reordered"] if vocab else []) + [f"residual {k}" for k in kinds]
        undone += ["experts renumbered"] if experts else []
        names = " and ".join(related)
        said = []
        if vocab:
            said.append("its vocabulary is reordered (rows aligned by their token strings, tokenizer.json)")
        if kinds:
            said.append(f"its residual stream is disguised by a {what} of the hidden dimension")
        if experts:
            layers = max(len(m) for m in experts.values())
            said.append(f"its experts are renumbered, the router's rows with them, in {layers} layer{'s' if layers != 1 else ''}")
            v2["experts"] = {
                n: {
                    "layers_renumbered": len(m),
                    "experts": len(next(iter(m.values())).perm),
                    "router_corr_before": round(min(x.corr_before for x in m.values()), 6),
                    "router_corr_after": round(min(x.corr_after for x in m.values()), 6),
                    "in_gauge": True,
                    "adopted": True,
                }
                for n, m in experts.items()
            }
        lead = f"Against {names}, {ev.suspect}: {' and '.join(said)} (which leaves the function unchanged); undone, "
        v2["explanation"] = lead + v2["explanation"][0].lower() + v2["explanation"][1:]
        ev.memo(EVIDENCE, lambda: ev2)
        ev.memo(ADOPTED, dict).update({n: found[n].gauge for n in related})
        v2["gauge"] = section
        v2["undone"] = list(verdict.get("undone") or []) + undone
        if verdict.get("warnings"):
            v2.setdefault("warnings", []).extend(verdict["warnings"])
        return v2


def token_rows(g, sides: list, maps: dict, ixs: dict) -> tuple[View, list, tuple]:
    """A vocabulary matrix's whole views (not cropped to the shorter vocabulary) and its rows
    paired by token: the suspect rows every candidate has a token for, each candidate's rows of
    those tokens (rows of equal index for a candidate whose order is the suspect's)."""
    s_ix = ixs[g.suspect]
    s_view = View((s_ix.seg(s_ix.model.tensors[g.tensor]),))
    full, lookup = [], []
    for name, view, gain, gz in sides:
        c_ix = ixs[name]
        entry = c_ix.by_name.get(g.canonical)
        cv = View((c_ix.seg(entry),)) if entry is not None else view
        full.append((name, cv, gain, gz))
        if name in maps:
            si, ci = maps[name]
            lookup.append(dict(zip(si.tolist(), ci.tolist())))
        else:
            lookup.append({i: i for i in range(min(s_view.rows, cv.rows))})
    keep = sorted(set.intersection(*(set(d) for d in lookup))) if lookup else []
    s_rows = np.array(keep, dtype=np.int64)
    return s_view, full, (s_rows, tuple(np.array([d[i] for i in keep], dtype=np.int64) for d in lookup))


def recomputed(row: dict) -> dict:
    """A refitted row's rounding tolerances: each candidate was recomputed (gains folded, a
    transform applied) from its stored values, and the suspect was stored after the same
    arithmetic on the evader's side, so both storage roundings count (their sum), not the
    bit-equality a plain copy allows."""
    for c in row["candidates"]:
        if c["rounding_tol"] is not None and MIXED not in (row["dtype"], c["dtype"]):
            c["rounding_tol"] = DTYPES[row["dtype"]].unit_roundoff + DTYPES[c["dtype"]].unit_roundoff
    return row


def vocab_maps(ev: Evidence) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Candidate -> (suspect rows, candidate rows) of the tokens both have, for the candidates
    whose tokenizer.json orders the shared tokens differently from the suspect's (read once)."""

    def compute() -> dict:
        suspect = ev.models.get(ev.suspect)
        se = embedding(suspect) if suspect is not None else None
        if se is None:
            return {}
        vs, why = read_vocab(suspect)
        if vs is None:
            if why:
                ev.warnings.append(f"vocabularies not aligned: {why}")
            return {}
        out = {}
        for n in ev.reps:
            m = ev.models.get(n)
            ce = embedding(m) if m is not None else None
            if ce is None:
                continue
            vc, why = read_vocab(m)
            if vc is None:
                if why:
                    ev.warnings.append(f"vocabularies not aligned: {why}")
                continue
            si, ci = shared_rows(vs, vc, suspect.tensors[se].shape[0], m.tensors[ce].shape[0])
            if reordered(si, ci):
                out[n] = (si, ci)
        return out

    return ev.memo(VOCAB, compute)


def vocab_matrix(name: str) -> bool:
    """A matrix whose rows are tokens: the embedding, and the output head."""
    return role(name) == "embed" or canonical(name) == "lm_head.weight"


def adopted(ev: Evidence) -> dict:
    """Candidate -> the transform into the suspect's gauge that the verdict adopted."""
    return ev.memo(ADOPTED, dict)


def gain_view(ix: Index, norm: str) -> Gain | None:
    """The norm (canonical name) whose gain a reader absorbs, if the model has it, with the
    offset its model type adds (Gemma's norms multiply by 1 + w)."""
    e = ix.by_name.get(canonical(norm)) or ix.by_name.get(norm)
    if e is None or len(e.shape) != 1:
        return None
    return Gain(View((ix.seg(e),)), gain_offset(ix.model))


_OFFSETS: dict[str, float] = {}


def gain_offset(model) -> float:
    """1 for model types whose norms multiply by (1 + w) (config.json's model_type), else 0;
    read once per model."""
    key = f"{model.root}@{model.commit}"
    if key not in _OFFSETS:
        doc, _ = read_config(model)
        kind = doc.get("model_type") if isinstance(doc, dict) else None
        _OFFSETS[key] = 1.0 if kind in OFFSET_GAIN_TYPES else 0.0
    return _OFFSETS[key]


def explain(ev: Evidence) -> dict:
    """The first answer of the explanations proper (not the refiners) on `ev`."""
    from lineage.explain import REGISTRY

    for step in REGISTRY:
        if step.refines:
            continue
        out = step.apply(ev, None, [])
        if out is not None:
            return out
    raise AssertionError("Derived or Unrelated always answers")
