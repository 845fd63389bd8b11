"""A reconstruction certificate: the recovered recipe, rerun, compared with the suspect.

`lineage certify OUTPUT_DIR` (jobs/cli.py) runs each blend's
`verdicts/SUSPECT.recipe.yaml` with mergekit into `OUTPUT_DIR/certify/SUSPECT`
and then `compare`s the result with the suspect, tensor by tensor: the
relative distance |rerun - suspect| / |suspect| against the unit roundoff of
the suspect's storage dtype (2^-8 for BF16: a reconstruction computed in
another order differs from the stored one by about one rounding step). A
deterministic recipe (linear, task arithmetic, slerp, passthrough) that
reproduces every tensor within it is `exact`; DARE draws random masks, so
its rerun is another draw and is reported as not replayable, and a merge
changed afterwards is reproduced only up to that change. Tensors are
compared one at a time (memory bounded by the largest tensor).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lineage.dtypes import DTYPES
from lineage.errors import LineageError
from lineage.files import inside

#: Methods whose rerun is deterministic (mergekit's DARE draws its masks at random).
DETERMINISTIC = ("linear", "task_arithmetic", "slerp", "passthrough", "ties", "model_stock")


def _tensors(folder: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file that holds it (regular files inside `folder` only)."""
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        if not f.is_file() or not inside(f, folder):
            continue
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                out.setdefault(k, f)
    return out


def compare(rerun: Path, suspect: Path) -> dict:
    """Per tensor |rerun - suspect| / |suspect|, and the certificate that summarises them."""
    import torch
    from safetensors import safe_open

    made, want = _tensors(rerun), _tensors(suspect)
    if not want:
        raise LineageError(f"{suspect}: no .safetensors files to compare the rerun with")
    rows = []
    for name, f in sorted(want.items()):
        with safe_open(str(f), framework="pt") as h:
            s = h.get_tensor(name)
        dtype = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}.get(s.dtype)
        if name not in made or dtype is None:
            rows.append(
                {"tensor": name, "rel_dist": None, "within": False, "reason": "missing" if name not in made else "not a float"}
            )
            continue
        with safe_open(str(made[name]), framework="pt") as h:
            r = h.get_tensor(name)
        if r.shape != s.shape:
            rows.append(
                {"tensor": name, "rel_dist": None, "within": False, "reason": f"shape {list(r.shape)} != {list(s.shape)}"}
            )
            continue
        s64, r64 = s.double(), r.double()
        rel = float((r64 - s64).norm() / s64.norm().clamp_min(1e-300))
        rows.append({"tensor": name, "rel_dist": rel, "within": rel <= DTYPES[dtype].unit_roundoff, "reason": ""})
    rels = [r["rel_dist"] for r in rows if r["rel_dist"] is not None]
    return {
        "tensors": len(rows),
        "within_storage_rounding": sum(r["within"] for r in rows),
        "max_rel_dist": max(rels) if rels else math.inf,
        "median_rel_dist": statistics.median(rels) if rels else math.inf,
        "worst": sorted((r for r in rows if not r["within"]), key=lambda r: -(r["rel_dist"] or math.inf))[:5],
    }


def certificate(verdict: dict, cmp: dict, rerun: str) -> dict:
    """The verdict's `certificate` section: the comparison, and what it can and cannot prove."""
    method = verdict.get("method")
    family = verdict.get("merge_family")
    trained = bool((verdict.get("residual") or {}).get("trained_after"))
    replayable = (method in DETERMINISTIC or (method == "unknown" and family == "ties")) and not trained
    exact = cmp["within_storage_rounding"] == cmp["tensors"]
    if exact:
        note = "the recipe reproduces every tensor within the storage dtype's rounding"
    elif not replayable and family and family != "ties":
        note = "DARE draws random masks: the rerun is another draw, equal in distribution only"
    elif trained:
        note = "the merge was changed afterwards: the recipe reproduces it only up to that change"
    else:
        note = "the recipe does not reproduce the suspect: see `worst`"
    return {"rerun": rerun, "replayable": replayable, "exact": exact, "note": note, **cmp}
