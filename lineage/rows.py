"""One output row per suspect tensor, and its Arrow schema.

The row carries what a person queries (per-candidate similarity, the blend
weights with standard errors, residual, R^2, conditioning) and the
sufficient statistics they came from (`stats_*`: the Gram and sums of the
difference columns, and the Gram of their row sums and of their column sums
for the permutation null, see fit.py), so a verdict, or a user with DuckDB,
can refit any subset of candidates without reading weights again.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from lineage.align import Group
from lineage.dtypes import rounding_tolerance
from lineage.errors import where
from lineage.fit import blend, single
from lineage.schema import with_docs
from lineage.stats import Stats, to_columns

#: Bumped when the stored statistics change meaning or columns (2: row and
#: column sums for the permutation null, dropped-delta energy). Part of the
#: audit fingerprint, so an output_dir written by another version is refused,
#: never resumed into a mixed dataset.
ROWS_VERSION = 2

CANDIDATE = pa.struct(
    [
        ("candidate", pa.string()),
        ("tensor", pa.string()),
        ("dtype", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("cosine", pa.float64()),
        ("corr", pa.float64()),
        ("rel_dist", pa.float64()),
        ("exact_frac", pa.float64()),
        ("near_frac", pa.float64()),
        ("z", pa.float64()),
        ("rounding_tol", pa.float64()),
    ]
)
WEIGHT = pa.struct([("candidate", pa.string()), ("weight", pa.float64()), ("se", pa.float64())])
SCHEMA = with_docs(
    pa.schema(
        [
            ("tensor", pa.string()),
            ("canonical", pa.string()),
            ("layer", pa.int32()),
            ("component", pa.string()),
            ("ndim", pa.int32()),
            ("shape", pa.list_(pa.int64())),
            ("numel", pa.int64()),
            ("dtype", pa.string()),
            ("status", pa.string()),
            ("reason", pa.string()),
            ("elements", pa.int64()),
            ("bytes_read", pa.int64()),
            ("candidates", pa.list_(CANDIDATE)),
            ("base", pa.string()),
            ("blend", pa.list_(WEIGHT)),
            ("residual_rel", pa.float64()),
            ("r2", pa.float64()),
            ("cos_fit", pa.float64()),
            ("cond", pa.float64()),
            ("raw_cond", pa.float64()),
            ("stats_order", pa.list_(pa.string())),
            ("stats_gram", pa.list_(pa.float64())),
            ("stats_sums", pa.list_(pa.float64())),
            ("stats_exact", pa.list_(pa.int64())),
            ("stats_near", pa.list_(pa.int64())),
            ("stats_dropped", pa.list_(pa.float64())),
            ("stats_cols", pa.int64()),
            ("stats_rowgram", pa.list_(pa.float64())),
            ("stats_colgram", pa.list_(pa.float64())),
            ("unit", pa.int64()),
        ]
    ),
    "tensors",
)
#: Hive partition column, not stored in the files.
PARTITION = "suspect"


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) or math.isinf(x) else x


def tensor_row(group: Group, stats: Stats | None, error: str | None = None, base: str | None = None, unit: int = -1) -> dict:
    """The output row of `group`, from its stats or the reason it has none."""
    row: dict = {
        "tensor": group.tensor,
        "canonical": group.canonical,
        "layer": group.layer,
        "component": group.component,
        "ndim": len(group.shape),
        "shape": list(group.shape),
        "numel": math.prod(group.shape),
        "dtype": group.dtype,
        "status": group.status,
        "reason": group.reason,
        "elements": 0,
        "bytes_read": 0,
        "candidates": [],
        "base": None,
        "blend": [],
        "residual_rel": None,
        "r2": None,
        "cos_fit": None,
        "cond": None,
        "raw_cond": None,
        "stats_order": [],
        "stats_gram": [],
        "stats_sums": [],
        "stats_exact": [],
        "stats_near": [],
        "stats_dropped": [],
        "stats_cols": None,
        "stats_rowgram": [],
        "stats_colgram": [],
        "unit": unit,
    }
    if error is None and stats is not None and stats.nonfinite:
        error = "non-finite values: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.nonfinite.items()))
    if error is not None:
        row["status"], row["reason"] = "error", error
    sides = {s.candidate: s for s in group.sides}
    singles = {}
    if row["status"] == "ok" and stats is not None:
        try:
            singles = {c: single(stats, c) for c in stats.order}
            b = blend(stats, base=base)
        except (ArithmeticError, ValueError, np.linalg.LinAlgError) as e:  # extreme values; never a lost audit
            path = group.view.segments[0].path if group.view is not None else "?"
            row["status"], row["reason"] = "error", f"{where(path, group.tensor)}: fit failed ({type(e).__name__}: {e})"
            singles, stats = {}, None
    if row["status"] == "ok" and stats is not None:
        row.update(bytes_read=stats.bytes_read, **to_columns(stats))
        if b is not None:
            row.update(
                base=b.base,
                blend=[{"candidate": c, "weight": _finite(w), "se": _finite(b.se[c])} for c, w in b.weights.items()],
                residual_rel=_finite(b.residual_rel),
                r2=_finite(b.r2),
                cos_fit=_finite(b.cos_fit),
                cond=_finite(b.cond),
                raw_cond=_finite(b.raw_cond),
            )
    for name, side in sides.items():
        sg = singles.get(name)
        cdtype = side.view.dtype if side.view is not None else None
        row["candidates"].append(
            {
                "candidate": name,
                "tensor": side.view.label if side.view is not None else None,
                "dtype": cdtype,
                "status": "ok"
                if sg is not None
                else ("error" if row["status"] == "error" and side.view is not None else "unpaired"),
                "reason": side.reason or (row["reason"] if sg is None and side.view is not None else ""),
                "cosine": _finite(sg.cosine) if sg else None,
                "corr": _finite(sg.corr) if sg else None,
                "rel_dist": _finite(sg.rel_dist) if sg else None,
                "exact_frac": sg.exact_frac if sg else None,
                "near_frac": stats.near[stats.order.index(name)] / stats.n if sg and stats is not None and stats.n else None,
                "z": _finite(sg.z) if sg else None,
                "rounding_tol": rounding_tolerance(group.dtype, cdtype) if cdtype else None,
            }
        )
    return row
