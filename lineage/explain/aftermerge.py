"""What happened after the merge: the blend's residual, per matrix and per layer.

The blend fit leaves, on every matrix, a residual |s - fit| / |s|. Where
that is within the storage rounding the merge is all there is (`none`).
Otherwise it is read by where it lies:

- `layers`: some layers of the stack carry it and the others are within
  rounding (AFTER_CHANGED times the rounding): training (or an edit)
  confined to those layers, e.g. "then trained further in layers 20-31";
- `uniform`: every matrix carries about the same relative residual
  (coefficient of variation across matrices at most AFTER_UNIFORM_CV):
  what adding noise in proportion to each tensor's scale leaves;
- `spread`: everywhere, unevenly: what training the whole model leaves (and
  also a sparse merge's drop noise, or quantisation, whose error depends on
  each matrix's distribution).

Its energy is given relative to the suspect (median residual) and to the
best single parent's residual (the blend's gain). The spectrum of the
residual, which would tell noise from low-rank training more surely, is
not in the stored statistics: this reads only its size and where it is.
"""

from __future__ import annotations

import math
import statistics

from lineage.dtypes import DTYPES
from lineage.explain.evidence import Evidence, median
from lineage.explain.table import Row
from lineage.explain.thresholds import AFTER_CHANGED, AFTER_UNIFORM_CV


def storage_noise(r: Row, use: list[str]) -> float:
    """The relative residual (RMS) that storing the blend's result alone leaves: a relative
    error uniform within the coarser of the rounding tolerance and the unit roundoff of each
    parent's dtype (a blend of BF16 parents, stored in BF16, is rounded once more), over
    sqrt(3). Measured: 0.0017 for float32 parents blended into BF16, 0.0021 for mergekit's
    BF16 arithmetic, against 0.0023 here."""
    out = 0.0
    for c in r.cands:
        if c.candidate in use:
            unit = DTYPES[c.dtype].unit_roundoff if c.dtype in DTYPES else 0.0
            out = max(out, c.rounding_tol or 0.0, unit)
    return out / math.sqrt(3.0)


def after_merge(ev: Evidence, use: list[str], base: str | None) -> dict:
    """The residual of the blend over `use` (refitted per matrix), characterised."""
    per: list[tuple[int | None, str, float, float]] = []
    for r, b in ev.refits(use, base, ev.free_weights):
        if r.ndim < 2:
            continue
        per.append((r.layer, r.component, b.residual_rel, storage_noise(r, use)))
    if not per:
        return {"kind": None}
    changed = [p for p in per if p[2] > AFTER_CHANGED * max(p[3], 1e-12)]
    out: dict = {
        "matrices": len(per),
        "matrices_changed": len(changed),
        "median_residual": median(p[2] for p in per),
    }
    if not changed:
        return {"kind": "none", **out}
    layers = sorted({p[0] for p in per if p[0] is not None})
    hit = sorted({p[0] for p in changed if p[0] is not None})
    by_layer = {str(i): round(statistics.median(p[2] for p in per if p[0] == i), 6) for i in layers}
    rels = [p[2] for p in per]
    mean = statistics.fmean(rels)
    cv = statistics.pstdev(rels) / mean if mean > 0 else 0.0
    out |= {"residual_by_layer": by_layer, "cv_across_matrices": round(cv, 4)}
    if layers and len(hit) < len(layers) and len(changed) < len(per):
        comps = sorted({p[1] for p in changed})
        return {"kind": "layers", "layers": hit, "components": comps, **out}
    return {"kind": "uniform" if cv <= AFTER_UNIFORM_CV else "spread", **out}


def describe(a: dict) -> str:
    """One sentence for the explanation ('' when there is nothing to say)."""
    k = a.get("kind")
    if k == "none":
        return " After the merge: nothing; every matrix is the blend within storage rounding."
    if k == "layers":
        ls = a["layers"]
        span = f"{ls[0]}-{ls[-1]}" if ls == list(range(ls[0], ls[-1] + 1)) else ", ".join(map(str, ls))
        return (
            f" After the merge it was changed in layers {span} only ({', '.join(a['components'])}; median relative "
            f"residual {a['median_residual']:.2g}), the rest being the blend within storage rounding: trained (or "
            "edited) there."
        )
    if k == "uniform":
        return (
            f" After the merge every matrix was changed by about the same relative amount ({a['median_residual']:.2g}, "
            f"varying {a['cv_across_matrices']:.0%} across matrices): what added noise leaves."
        )
    if k == "spread":
        return (
            f" After the merge it was changed throughout, unevenly (median relative residual {a['median_residual']:.2g}, "
            f"varying {a['cv_across_matrices']:.0%} across matrices): what training the whole model (or a sparse "
            "merge's drops, or quantisation) leaves."
        )
    return ""
