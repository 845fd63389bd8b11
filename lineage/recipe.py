"""A blend's verdict as the mergekit configuration that would make it again.

For a blend (and a derived suspect whose layers are copies of its parent's,
rearranged or repeated: a passthrough of one model) `recipe` writes the configuration mergekit takes:
`merge_method`, `base_model`, the models from the candidates' sources, with
each parent's weight (or slerp's t) as a scalar, a gradient (the schedule's
anchors) or a per-filter list (`self_attn`, `mlp`, and the value for the
rest), passthrough `slices` from `layer_sources`, and the suspect's dtype.
Every field comes from the verdict, and the comment block above it says
from what evidence. What weights cannot give is said there too: a random
sparse merge's density (DARE, DELLA) is an estimate and its masks cannot be
replayed, and a merge trained afterwards is reproduced only up to that
training. (TIES and breadcrumbs, which drop by magnitude, are read exactly:
explain/consensus.py.)
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import yaml

#: Sparse merge families (explain/sparse.py) -> the mergekit method that makes them.
SPARSE_METHODS = {
    "ties": "ties",
    "dare": "dare_ties",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs/della": "breadcrumbs",
    "della": "della",
    "sce": "sce",
}
#: Schedule components -> the mergekit filter that addresses them.
FILTERS = {"attention": "self_attn", "mlp": "mlp", "expert": "experts", "router": "gate"}
DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def model_ref(source: str, commit: str | None = None) -> str:
    """A candidate's source as mergekit names a model: hf://ORG/NAME@REV -> ORG/NAME@COMMIT (the
    commit the audit read, so the recipe names the very weights), a path as is."""
    if not source.startswith("hf://"):
        return source
    repo = source[len("hf://") :].partition("@")[0]
    rev = commit or source.partition("@")[2]
    return f"{repo}@{rev}" if rev else repo


def dtype_of(dtypes: list[str]) -> str:
    """The mergekit dtype of the suspect's most common float dtype (FP8 and others: bfloat16)."""
    common = Counter(d for d in dtypes if d.startswith(("F", "BF"))).most_common(1)
    return DTYPES.get(common[0][0], "bfloat16") if common else "bfloat16"


def setting(s: dict | None, scalar: float) -> Any:
    """A parameter value as mergekit takes it, from a schedule (schedule.py): a scalar, a gradient
    (anchors spread evenly over the layers; a free per-layer schedule is a gradient with one anchor
    per layer), or a per-filter list ending with the value for the rest."""
    if not s or s["kind"] == "constant":
        return round(s["anchors"][0], 4) if s and s.get("anchors") else round(scalar, 4)
    if s["kind"] in ("linear", "piecewise"):
        return [round(x, 4) for x in s["anchors"]]

    def value(comp: str) -> Any:
        p = s["components"][comp]
        if p["kind"] == "per_layer":
            layers = s["per_layer"][comp]
            return [layers[i] for i in sorted(layers, key=int)]
        return p["anchors"][0] if p["kind"] == "constant" else p["anchors"]

    comps = [c for c in s.get("components", {}) if c in FILTERS]
    if len(comps) == 1:
        return value(comps[0])
    out: list[dict] = [{"filter": FILTERS[c], "value": value(c)} for c in comps]
    rest = s.get("outside_stack") or {}
    out.append({"value": round(sum(rest.values()) / len(rest), 4) if rest else round(scalar, 4)})
    return out


def recipe(v: dict, dtypes: list[str]) -> tuple[dict, list[str]] | None:
    """(mergekit configuration, comment lines with the evidence) for verdict `v`, or None."""
    src = {n: model_ref(r["source"], r.get("commit")) for n, r in (v.get("sources") or {}).items()}
    method, parents = v.get("method"), v.get("parents") or []
    notes: list[str] = []
    cfg: dict[str, Any]
    if v["verdict"] == "derived" and v.get("layer_map") and v.get("layer_map_copies"):
        name = parents[0]["name"]
        cfg = {
            "merge_method": "passthrough",
            "slices": slices({i: {"model": name, "layer": j} for i, j in v["layer_map"].items()}, src),
        }
        notes.append(f"layer_map: suspect layers taken from {name} as {v['layer_map']}")
    elif v["verdict"] != "blend":
        return None
    elif method == "unknown" and v.get("merge_family") and not v.get("base"):
        return None  # a sparse merge on a base not among the candidates: mergekit needs the base
    elif method == "passthrough":
        cfg = {"merge_method": "passthrough", "slices": slices(v["layer_sources"], src)}
        notes.append("layer_sources: every layer a copy, within storage rounding, of the source layer")
    elif method == "slerp":
        sl = v["slerp"]
        t = setting(sl.get("t_schedule"), sl["t"])
        cfg = {
            "merge_method": "slerp",
            "base_model": src[sl["from"]],
            "models": [{"model": src[sl["from"]]}, {"model": src[sl["toward"]]}],
            "parameters": {"t": t},
        }
        notes.append(f"slerp from {sl['from']} toward {sl['toward']}: t {sl['t']:.4f}, 95% interval {sl['ci95']}")
        notes.append(
            "which endpoint mergekit was given as base cannot be told from the weights (slerp(a, b, t) = slerp(b, a, 1 - t))"
        )
    elif method == "model_stock":
        cfg = {
            "merge_method": "model_stock",
            "base_model": src[v["base"]],
            "models": [{"model": src[p["name"]]} for p in parents],
        }
        ms = v.get("evidence", {}).get("model_stock", {})
        notes.append(
            f"model_stock on base {v['base']}: the fine-tunes' equal weights and the base's follow the formula "
            f"(median t {ms.get('median_t', float('nan')):.3f}, within {ms.get('median_t_error', float('nan')):.1e} of it)"
        )
    elif method == "task_arithmetic":
        cfg = {
            "merge_method": "task_arithmetic",
            "base_model": src[v["base"]],
            "models": [{"model": src[p["name"]], "parameters": {"weight": weight(v, p)}} for p in parents],
        }
        own = 1 - sum(p["weight"] for p in parents)  # the base's own weight in the affine blend
        if any(p["weight"] < 0 for p in parents):
            notes.append(
                f"base {v['base']}: declared in the model set; a negative weight subtracts that model's delta (task negation)"
            )
        elif own > 0:
            notes.append(
                f"base {v['base']}: declared in the model set, keeping {own:.3f} of the blend (task weights summing below 1)"
            )
        else:
            notes.append(f"base {v['base']}: the candidate at a clearly negative weight in the affine fit")
    elif method == "unknown" and v.get("merge_family"):
        fam = v["merge_family"]
        base = v["base"]
        near = (v.get("evidence", {}).get("blend", {}).get("median_near_frac") or {}).get(base)
        density = round(1 - near**0.5, 2) if near is not None and len(parents) == 2 else None
        rw = (v.get("evidence", {}).get("sparse") or {}).get("recipe_weights") or {}
        election = (v.get("evidence", {}).get("sparse") or {}).get("sign_election") or {}
        scales = (v.get("evidence", {}).get("sparse") or {}).get("kept_scale") or {}
        told = (v.get("evidence", {}).get("sparse") or {}).get("recipe") or {}  # explain/consensus.py
        by_scale = {
            p["name"]: rw.get(p["name"], weight(v, p)) / scales[p["name"]]["scale"]
            for p in parents
            if fam == "dare" and scales.get(p["name"], {}).get("scale")
        }
        if by_scale and len(by_scale) == len(parents):  # DARE scales a kept delta by weight / density
            density = round(sum(by_scale.values()) / len(by_scale), 2)
        merge_method = told.get("merge_method") or (
            "dare_linear" if fam == "dare" and election.get("elected") is False else SPARSE_METHODS.get(fam, "dare_ties")
        )
        dens = told.get("density") or {}
        gamma = told.get("gamma") or {}
        cfg = {
            "merge_method": merge_method,
            "base_model": src[base],
            "models": [
                {
                    "model": src[p["name"]],
                    "parameters": {
                        "weight": rw.get(p["name"], weight(v, p)),
                        **({"density": dens.get(p["name"], density)} if dens.get(p["name"], density) else {}),
                        **({"gamma": gamma[p["name"]]} if p["name"] in gamma else {}),
                    },
                }
                for p in parents
            ],
        }
        if fam == "della":
            cfg["parameters"] = {"epsilon": told.get("epsilon", 0.1), **({"lambda": told["lambda"]} if "lambda" in told else {})}
        if "normalize" in told:
            cfg["parameters"] = {**cfg.get("parameters", {}), "normalize": told["normalize"]}
        if fam == "sce":  # SCE weighs each parent by its delta's energy, and drops one shared mask
            for m in cfg["models"]:
                m.pop("parameters")
            # 1 - near is a lower bound (a kept delta below the storage rounding also leaves the base's
            # value): the next multiple of 0.05, as people write it (the certificate checks it)
            topk = min(1.0, math.ceil(round((1 - near) * 20, 6)) / 20) if near is not None else None
            cfg["parameters"] = {"select_topk": topk} if topk is not None else {}
            density = None
        kept = (v.get("evidence", {}).get("sparse") or {}).get("kept_deltas") or {}
        if "ratio" in kept and election.get("elected") is kept.get("elected"):
            notes.append(
                f"{merge_method}: where the parents' deltas disagree in sign both were added {kept['ratio']:.3f} times as "
                f"often as where they agree (interval {kept['interval'][0]:.3f}-{kept['interval'][1]:.3f}; "
                + {True: "signs elected", False: "no election", None: "not told apart"}[kept["elected"]]
                + ")"
            )
        elif "ratio" in election:
            notes.append(
                f"{merge_method}: where the parents' deltas disagree in sign the suspect follows them {election['ratio']:.3f} "
                f"times as strongly as where they agree (interval {election['interval'][0]:.3f}-{election['interval'][1]:.3f}; "
                + {True: "signs elected", False: "no election", None: "not told apart: dare_ties assumed"}[election["elected"]]
                + ")"
            )
        if rw and kept.get("normalized"):
            notes.append(
                "weights: the shares of the added deltas where both were kept and agree ("
                + ", ".join(f"{n} {c:.3f}" for n, c in kept["added_coefficients"].items())
                + "), as mergekit's normalize divides by the weights kept"
            )
        elif rw and kept.get("magnitude") and kept.get("normalized") is False:
            notes.append(
                "weights: the one factor each parent's kept deltas were scaled by where kept alone ("
                + ", ".join(f"{n} {f:.4f}" for n, f in kept["factors"].items())
                + "); no rescale or normalisation"
            )
        elif rw and election.get("elected"):
            notes.append("weights: the fit where the parents' deltas agree in sign (election changes nothing there)")
        elif rw:
            notes.append(
                f"sparse merge, {fam} family (dropped-delta energy; kept deltas not renormalised): weights are the linear "
                "projection divided by the share of each delta's energy kept"
            )
        else:
            notes.append(
                f"sparse merge, {fam} family (dropped-delta energy); weights are the linear projection, not the recipe's"
            )
        if (v.get("evidence", {}).get("sparse") or {}).get("rescaled_to_parent"):
            notes.append(
                f"rescaled: kept deltas land on the parents' own values ({', '.join(f'{n} {e:.0%}' for n, e in near_parents(v, parents).items())} "
                "of elements), as mergekit's rescale and renormalisation leave them"
            )
        if "normalize" in told:
            notes.append(
                f"normalize: {str(told['normalize']).lower()}: agreeing kept deltas were "
                + ("divided by the weights kept" if told["normalize"] else "added as they are")
                + f", unlike {merge_method}'s default"
            )
        if gamma:
            notes.append(
                "gamma: the share of each parent's deltas above the band of magnitudes it kept ("
                + ", ".join(f"{n} {b['above_share']:.4f}" for n, b in kept["bands"].items())
                + ")"
            )
        elif fam in ("breadcrumbs", "breadcrumbs/della"):
            notes.append("gamma (the largest deltas breadcrumbs also drops) is not measured: mergekit's default")
        rate = kept.get("keep_rate") or {}
        if fam == "della" and "epsilon" in told:
            notes.append(
                f"epsilon {told['epsilon']}, density {rate['density']:.3f}: a delta's kept rate rises with its magnitude "
                f"rank in its row from {rate['intercept']:.3f} by {rate['slope']:.3f} (standard error {rate['slope_se']:.3f}): "
                "2 epsilon, about the density"
            )
        elif fam == "dare" and "density" in told:
            notes.append(
                f"density {dens[parents[0]['name']]}: a delta's kept rate, flat over its magnitude rank in its row "
                f"({rate['density']:.3f}; slope {rate['slope']:.3f}, standard error {rate['slope_se']:.3f})"
            )
        if told.get("carried"):
            notes.append(
                "each parent's kept-alone factor over the rescale that density gives (mergekit's, to the delta's L1 norm): "
                + ", ".join(f"{n} {w:.4f}" for n, w in told["carried"].items())
                + (" (the weights)" if kept.get("normalized") is False else " (lambda; the weights are the shares)")
            )
        if fam == "della" and "epsilon" not in told:
            notes.append("epsilon (the spread of DELLA's keep probabilities) is not measured: 0.1 assumed")
        if fam == "sce" and near is not None:
            notes.append(
                f"select_topk {topk}: {1 - near:.3f} of elements are not at {base}'s value (SCE drops one mask for every "
                "parent; a kept delta below the storage rounding looks dropped, so this is a lower bound, rounded up to "
                "the next 0.05); its weights are not parameters (SCE weighs each delta by its energy)"
            )
        if dens and not kept.get("magnitude"):
            pass  # DELLA's, from its keep rates (said above)
        elif dens:
            notes.append(
                "density: the share of each parent's deltas in the band of magnitudes it kept ("
                + ", ".join(f"{n} {b['kept_share']:.4f}" for n, b in kept["bands"].items())
                + "; within 0.01 of a multiple of 0.05: that multiple)"
            )
        elif density and by_scale and len(by_scale) == len(parents):
            notes.append(
                f"density {density}: each parent's weight over the one factor its kept deltas were scaled by ("
                + ", ".join(f"{n} {d:.3f}" for n, d in by_scale.items())
                + ")"
            )
        elif density:
            notes.append(
                f"density {density}: estimated from the {near:.2f} of elements left at {base}'s value (both deltas dropped: (1 - d)^2)"
            )
        if fam in ("dare", "della"):
            notes.append(f"{fam.upper()} draws random masks: rerunning gives another draw, equal in distribution only")
    else:
        cfg = {
            "merge_method": "linear",
            "models": [{"model": src[p["name"]], "parameters": {"weight": weight(v, p)}} for p in parents],
        }
        if method == "unknown":
            notes.append("the merge was changed afterwards (trained further): this reproduces the merge up to that training")
        total = (v.get("evidence", {}).get("blend") or {}).get("weights_sum")
        if total is not None:
            cfg["parameters"] = {"normalize": False}
            notes.append(f"normalize: false: the weights sum to {total:.3f}, and mergekit would otherwise divide by that sum")
    cfg["dtype"] = dtype_of(dtypes)
    if v.get("undone"):
        notes.append(
            f"the suspect is disguised ({', '.join(v['undone'])}): this is the merge as made in its parents' own "
            "weights; the disguise, a function-preserving transform of the result or of a parent, is not part of it"
        )
    for p in parents:
        notes.append(f"{p['name']}: weight {p['weight']:.4f}, 95% interval {p['ci95']}")
    if v.get("residual"):
        notes.append(f"the blend leaves {v['residual']['of_best_single_parent']:.2f} of the best single parent's residual")
    return cfg, notes


def near_parents(v: dict, parents: list[dict]) -> dict[str, float]:
    """Each parent's share of elements where the suspect holds the parent's value (within rounding)."""
    near = v.get("evidence", {}).get("blend", {}).get("median_near_frac") or {}
    return {p["name"]: near[p["name"]] for p in parents if near.get(p["name"]) is not None}


def _clean(x: Any) -> Any:
    """-0.0 -> 0.0 through nested lists and dicts (a rounded tiny negative reads badly)."""
    if isinstance(x, float):
        return 0.0 if x == 0 else x
    if isinstance(x, list):
        return [_clean(y) for y in x]
    if isinstance(x, dict):
        return {k: _clean(y) for k, y in x.items()}
    return x


def weight(v: dict, p: dict) -> Any:
    return setting((v.get("schedule") or {}).get(p["name"]), p["weight"])


def slices(sources: dict[str, dict], src: dict[str, str]) -> list[dict]:
    """Passthrough slices: runs of consecutive suspect layers from consecutive layers of one model."""
    out: list[dict] = []
    run: list[Any] | None = None
    for i in sorted(sources, key=int):
        m, j = sources[i]["model"], sources[i]["layer"]
        if run is not None and run[0] == m and run[2] == j:
            run[2] = j + 1
            continue
        if run is not None:
            out.append({"sources": [{"model": src[run[0]], "layer_range": [run[1], run[2]]}]})
        run = [m, j, j + 1]
    if run is not None:
        out.append({"sources": [{"model": src[run[0]], "layer_range": [run[1], run[2]]}]})
    return out


def render(v: dict, dtypes: list[str]) -> str | None:
    """The recipe file's text: the evidence as comments, then the configuration."""
    r = recipe(v, dtypes)
    if r is None:
        return None
    cfg, notes = r
    head = [f"# mergekit configuration recovered by lineage from the weights of {v['suspect']} (verdict {v['verdict']})"]
    head += [f"# {n}" for n in notes]
    return "\n".join(head) + "\n" + yaml.safe_dump(_clean(cfg), sort_keys=False)
