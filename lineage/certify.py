"""A reconstruction certificate: the recovered recipe, rerun, compared with the suspect.

`lineage certify OUTPUT_DIR` (jobs/cli.py) runs each blend's
`verdicts/SUSPECT.recipe.yaml` with mergekit into `OUTPUT_DIR/certify/SUSPECT`
and then `compare`s the result with the suspect, tensor by tensor: the
relative distance |rerun - suspect| / |suspect| against the unit roundoff of
the suspect's storage dtype (2^-8 for BF16: a reconstruction computed in
another order differs from the stored one by about one rounding step). A
deterministic recipe (linear, task arithmetic, slerp, passthrough) that
reproduces every tensor within it is `exact`; DARE draws random masks, so
its rerun is another draw and is reported as not replayable; it is tested
in distribution instead (`distribution`: per tensor, the fraction of
elements moved from the base and the RMS of the move, suspect against
rerun). A merge changed afterwards is reproduced only up to that change. Tensors are
compared one at a time (memory bounded by the largest tensor).
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from lineage.dtypes import DTYPES
from lineage.errors import LineageError
from lineage.files import inside
from lineage.layout import layer_index

#: A layer index in a tensor name, and what precedes it.
LAYER = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks)\.)(\d+)\.")

#: Methods whose rerun is deterministic (mergekit's DARE draws its masks at random).
DETERMINISTIC = ("linear", "task_arithmetic", "slerp", "passthrough", "ties", "model_stock")


def _tensors(folder: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file that holds it (regular files inside `folder` only)."""
    from safetensors import safe_open

    out: dict[str, Path] = {}
    # a Hugging Face cache snapshot links its files into the repository's blobs/, two levels up
    tree = folder.parent.parent if folder.parent.name == "snapshots" else folder
    for f in sorted(folder.glob("*.safetensors")):
        if not f.is_file() or not inside(f, tree):
            continue
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                out.setdefault(k, f)
    return out


def compare(rerun: Path, suspect: Path, base: Path | None = None) -> dict:
    """Per tensor |rerun - suspect| / |suspect|, and the certificate that summarises them; with
    `base` (a DARE or DELLA merge's base model), also the distributional test (`distribution`)."""
    made = {n: (f, n) for n, f in _tensors(rerun).items()}
    want = _tensors(suspect)
    if not want:
        raise LineageError(f"{suspect}: no .safetensors files to compare the rerun with")
    return summarise(*compare_tensors(made, want, _tensors(base) if base is not None else {}))


def compare_range(rerun: Path, suspect: Path, base: Path | None, a: int, b: int, first: bool) -> tuple[list, list]:
    """The rows of a rerun of suspect layers [a, b) only (its layers numbered from 0), and, when
    `first`, of the tensors outside the layer stack (embeddings, final norm, head)."""
    made = {}
    for n, f in _tensors(rerun).items():
        i = layer_index(n)
        made[n if i is None else renumber(n, i + a)] = (f, n)
    want = {}
    for n, f in _tensors(suspect).items():
        i = layer_index(n)
        if (i is None and first) or (i is not None and a <= i < b):
            want[n] = f
    return compare_tensors(made, want, _tensors(base) if base is not None else {})


def renumber(name: str, layer: int) -> str:
    """`name` with its layer index replaced by `layer`."""
    return LAYER.sub(lambda m: f"{m.group(1)}{layer}.", name, count=1)


def suspect_layers(suspect: Path) -> int:
    """Layers in the suspect's stack (the largest layer index in its tensor names, plus one)."""
    return 1 + max((i for n in _tensors(suspect) if (i := layer_index(n)) is not None), default=-1)


def compare_tensors(made: dict[str, tuple[Path, str]], want: dict[str, Path], based: dict[str, Path]) -> tuple[list, list]:
    """Rows of the suspect's tensors `want` against the rerun's (`made`: suspect name -> file and
    name there), and the distributional rows against the base's tensors `based` when given."""
    import torch
    from safetensors import safe_open

    rows, dist = [], []
    for name, f in sorted(want.items()):
        with safe_open(str(f), framework="pt") as h:
            s = h.get_tensor(name)
        dtype = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}.get(s.dtype)
        if name not in made or dtype is None:
            rows.append(
                {"tensor": name, "rel_dist": None, "within": False, "reason": "missing" if name not in made else "not a float"}
            )
            continue
        mf, mn = made[name]
        with safe_open(str(mf), framework="pt") as h:
            r = h.get_tensor(mn)
        if r.shape != s.shape:
            rows.append(
                {"tensor": name, "rel_dist": None, "within": False, "reason": f"shape {list(r.shape)} != {list(s.shape)}"}
            )
            continue
        s64, r64 = s.double(), r.double()
        rel = float((r64 - s64).norm() / s64.norm().clamp_min(1e-300))
        rows.append({"tensor": name, "rel_dist": rel, "within": rel <= DTYPES[dtype].unit_roundoff, "reason": ""})
        if name in based:
            with safe_open(str(based[name]), framework="pt") as h:
                bt = h.get_tensor(name)
            if bt.shape == s.shape:
                dist.append(kept(s64, r64, bt.double(), DTYPES[dtype].unit_roundoff, name))
    return rows, dist


def summarise(rows: list[dict], dist: list[dict]) -> dict:
    """The comparison's summary: tensors, how many within rounding, distances, the worst."""
    rels = [r["rel_dist"] for r in rows if r["rel_dist"] is not None]
    extra = {"distribution": distribution(dist)} if dist else {}
    return {
        **extra,
        "tensors": len(rows),
        "within_storage_rounding": sum(r["within"] for r in rows),
        "max_rel_dist": max(rels) if rels else math.inf,
        "median_rel_dist": statistics.median(rels) if rels else math.inf,
        "worst": sorted((r for r in rows if not r["within"]), key=lambda r: -(r["rel_dist"] or math.inf))[:5],
    }


def split_recipe(cfg: dict, layers: int, per: int) -> list[tuple[int, int, dict]]:
    """The recipe as sub-recipes over suspect layers [a, b) of at most `per` layers each, to run
    apart (by Ray tasks, jobs/cli.py): the models as one mergekit slice over [a, b), every
    per-layer parameter (a gradient, alone or per filter) given as its value at each of those
    layers, computed as mergekit computes it over the whole stack. A recipe that is already
    slices (passthrough) runs whole."""
    if "models" not in cfg or per >= layers or layers < 1:
        return [(0, max(layers, 1), cfg)]
    names = [m["model"] for m in cfg["models"]]
    out = []
    for a in range(0, layers, per):
        b = min(layers, a + per)
        sub = {k: v for k, v in cfg.items() if k not in ("models", "parameters")}
        if cfg.get("parameters"):
            sub["parameters"] = {k: _sub(v, a, b, layers) for k, v in cfg["parameters"].items()}
        sources = []
        for m in cfg["models"]:
            src: dict = {"model": m["model"], "layer_range": [a, b]}
            if m.get("parameters"):
                src["parameters"] = {k: _sub(v, a, b, layers) for k, v in m["parameters"].items()}
            sources.append(src)
        if cfg.get("base_model") and cfg["base_model"] not in names:
            sources.append({"model": cfg["base_model"], "layer_range": [a, b]})
        sub["slices"] = [{"sources": sources}]
        out.append((a, b, sub))
    return out


def _sub(v, a: int, b: int, n: int):
    """A parameter over layers [a, b) of n: a scalar as it is; a gradient as its value at each of
    those layers (a list of b - a values reproduces them exactly); per-filter lists entry by entry."""
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return [{**x, "value": _sub(x.get("value"), a, b, n)} for x in v]
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return [_at(v, i / (n - 1) if n > 1 else 1.0) for i in range(a, b)]
    return v


def _at(values: list, t: float) -> float:
    """A gradient's value at t in [0, 1], as mergekit interpolates it (config.evaluate_setting)."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


#: A rerun of DARE is consistent in distribution with the suspect when, per tensor, the fraction
#: of elements that moved from the base differs by at most this (or 5 binomial standard errors),
#: and the moved part's RMS by at most DARE_RMS_TOL relative.
DARE_KEPT_TOL = 0.01
DARE_RMS_TOL = 0.1


def kept(s, r, b, unit: float, name: str) -> dict:
    """How much of the suspect and of the rerun moved from the base: the fraction of elements
    beyond storage rounding of the base's, and the RMS of the move."""
    tol = unit * b.abs()
    ks, kr = float(((s - b).abs() > tol).double().mean()), float(((r - b).abs() > tol).double().mean())
    n = s.numel()
    rs, rr = float((s - b).norm()) / n**0.5, float((r - b).norm()) / n**0.5
    se = 5 * (max(ks * (1 - ks), 1e-12) / n) ** 0.5
    ratio = rs / rr if rr > 0 else (1.0 if rs == 0 else math.inf)
    ok = abs(ks - kr) <= max(DARE_KEPT_TOL, se) and abs(ratio - 1) <= DARE_RMS_TOL
    return {"tensor": name, "kept_suspect": ks, "kept_rerun": kr, "rms_ratio": ratio, "consistent": ok}


def distribution(rows: list[dict]) -> dict:
    """The distributional test over tensors: DARE's random masks cannot be replayed, but the
    fraction they keep and the rescale of what they keep can be compared."""
    return {
        "tensors": len(rows),
        "consistent": sum(r["consistent"] for r in rows),
        "max_kept_frac_diff": max(abs(r["kept_suspect"] - r["kept_rerun"]) for r in rows),
        "median_kept_frac": statistics.median(r["kept_suspect"] for r in rows),
        "median_rms_ratio": statistics.median(r["rms_ratio"] for r in rows),
        "worst": sorted(rows, key=lambda r: -abs(r["rms_ratio"] - 1))[:3],
        "all": rows,
    }


def implied_density(cmp: dict, used: float, parents: int) -> float | None:
    """The DARE density that would move as many elements as the suspect's, calibrated by the rerun.

    With k parents each keeping a fraction q d of its delta visible after rounding (d the
    density, q the share of kept deltas that storage rounding does not hide), an element stays
    at the base's value with probability (1 - q d)^k. The rerun at density `used` measures q;
    the suspect's moved fraction then gives its d (median over tensors)."""
    rows = [r for r in (cmp.get("distribution") or {}).get("all", []) if 0 < r["kept_rerun"] < 1 and 0 < r["kept_suspect"] < 1]
    if not rows or parents < 1:
        return None
    k = 1.0 / parents
    ds = [used * (1 - (1 - r["kept_suspect"]) ** k) / (1 - (1 - r["kept_rerun"]) ** k) for r in rows]
    return statistics.median(ds)


def certificate(verdict: dict, cmp: dict, rerun: str) -> dict:
    """The verdict's `certificate` section: the comparison, and what it can and cannot prove."""
    method = verdict.get("method")
    family = verdict.get("merge_family")
    trained = bool((verdict.get("residual") or {}).get("trained_after"))
    replayable = (method in DETERMINISTIC or (method == "unknown" and family in ("ties", "breadcrumbs", "sce"))) and not trained
    exact = cmp["within_storage_rounding"] == cmp["tensors"]
    if exact:
        note = "the recipe reproduces every tensor within the storage dtype's rounding"
    elif verdict.get("undone"):
        note = (
            f"the suspect is disguised ({', '.join(verdict['undone'])}): the rerun is the merge without the disguise, "
            "so it is not compared in the suspect's own weights"
        )
    elif not replayable and family in ("dare", "della"):
        note = f"{family.upper()} draws random masks: the rerun is another draw, equal in distribution only"
        d = cmp.get("distribution")
        if d:
            same = d["consistent"] == d["tensors"]
            note += (
                f"; in distribution it matches{'' if same else ' only'} on {d['consistent']}/{d['tensors']} "
                f"tensors (fraction moved from the base {d['median_kept_frac']:.3f}, differing by at most "
                f"{d['max_kept_frac_diff']:.4f}; RMS of the move {d['median_rms_ratio']:.3f}x the rerun's)"
            )
    elif trained:
        note = "the merge was changed afterwards: the recipe reproduces it only up to that change"
    else:
        note = "the recipe does not reproduce the suspect: see `worst`"
    return {"rerun": rerun, "replayable": replayable, "exact": exact, "note": note, **cmp}
