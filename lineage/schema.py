"""Every column lineage writes, documented in one place, and written into each file.

The outputs are made for analytics (DuckDB, Polars, Spark): four datasets,
each with a version and a description of every column here. `with_docs`
puts the descriptions into the Arrow schema (field metadata
`description`, schema metadata `lineage.dataset`, `lineage.schema_version`
and `lineage.version`), so a Parquet file explains itself:
`pq.read_schema(f).field("corr").metadata`. A test checks that no column
goes undocumented.

- `tensors/suspect=NAME/part-*.parquet`: one row per suspect tensor.
- `verdicts.parquet`: one row per suspect, flat.
- `relations.parquet`: one row per (suspect, other model) relation.
- `pairs/part-*.parquet`: one row per (pair of suspects, tensor) comparison.
"""

from __future__ import annotations

import pyarrow as pa

from lineage import __version__

#: Bumped when the verdict or relations tables change columns or meaning.
VERDICTS_VERSION = 2
RELATIONS_VERSION = 2

DOCS: dict[str, dict[str, str]] = {
    "tensors": {
        "tensor": "suspect tensor name, as stored",
        "canonical": "name with the container prefix removed (model., model.language_model., ...)",
        "layer": "index in the main decoder/encoder stack; null outside it",
        "component": "embedding, attention, mlp, expert, router, norm, head or other",
        "ndim": "number of dimensions of the suspect tensor",
        "shape": "shape of the suspect tensor",
        "numel": "elements of the suspect tensor",
        "dtype": "stored dtype of the suspect tensor (BF16, F32, F8_E4M3, ...)",
        "status": "ok, skipped (no counterpart, not a weight) or error (unreadable, non-finite, changed since planning)",
        "reason": "why a row is skipped or an error: file, tensor and problem",
        "elements": "elements compared (fewer than numel when sampled or cropped to common rows)",
        "bytes_read": "bytes read for this comparison: suspect and paired candidates",
        "candidates": "per candidate: its tensor(s), dtype, status, cosine, centered correlation (corr), relative distance "
        "|s - p| / |s| (rel_dist), fraction of bit-equal elements (exact_frac), fraction within storage rounding "
        "(near_frac), z of the covariance against the permutation null, and the rounding tolerance of the dtypes",
        "base": "candidate the blend is fitted relative to",
        "blend": "affine blend s - base = sum a_i (p_i - base): per candidate its weight and OLS standard error",
        "residual_rel": "|s - blend| / |s|",
        "r2": "R^2 of s - base explained by the blend",
        "cos_fit": "cosine of s - base with its fitted value",
        "cond": "condition number of the delta-space (base-relative) fit",
        "raw_cond": "condition number a naive fit on raw weights would face",
        "stats_order": "candidates in the order of the stored statistics' columns (the first is the reference r)",
        "stats_gram": "float64 Gram of [r, p_2 - r, ..., s - r], row-major: any subset of candidates can be refitted from it",
        "stats_sums": "sums of those columns",
        "stats_exact": "per candidate, elements bit-equal to the suspect",
        "stats_near": "per candidate, elements within storage rounding of the suspect",
        "stats_dropped": "per candidate j >= 1, energy of p_j - r where the suspect kept r's value (tells TIES from DARE)",
        "stats_cols": "columns of the matrix the elements came from",
        "stats_rowgram": "Gram of the per-row sums of the columns (permutation null)",
        "stats_colgram": "Gram of the per-column sums of the columns (permutation null)",
        "unit": "work unit that computed the row",
    },
    "verdicts": {
        "suspect": "suspect model name",
        "verdict": "identical, derived, blend, unrelated or inconclusive",
        "method": "for a blend: linear, slerp, task_arithmetic, unknown (sparsified), passthrough; null otherwise",
        "merge_family": "for a sparsified merge: ties, dare, ties/dare, breadcrumbs, della, breadcrumbs/della or sce",
        "base": "the candidate the blend is measured from (task arithmetic, sparse merges, slerp's start)",
        "t": "slerp's t (from the heavier parent toward the lighter)",
        "parents": "parents with weight and 95% interval (one parent at weight 1 for identical and derived; none for a derived suspect that sits between its candidates, see `closest`)",
        "parent_names": "the parents' names, for easy filtering (list_contains)",
        "closest": "candidate with the highest median correlation",
        "aliases": "candidates identical to a parent, grouped under it",
        "screened_out": "candidates dropped by pool screening",
        "relation_count": "other suspects this one is a copy or derivative of (see relations.parquet)",
        "tensors": "suspect tensors",
        "tensors_compared": "tensors compared with at least one candidate",
        "bytes_compared": "bytes read for the compared tensors",
        "elements_compared_frac": "fraction of the suspect's float elements compared",
        "tensors_skipped": "rows skipped or in error",
        "inconclusive_reason": "for inconclusive: the explanation's reason",
        "layer_map": "suspect layer -> parent layer, when the layers were rearranged (JSON)",
        "error": "why a suspect could not be audited at all",
        "source": "the suspect's source as given",
        "source_commit": "for a hub source: the commit it resolved to",
        "candidate_sources": "each candidate's source and commit",
        "lineage_version": "version of lineage that decided the verdict",
        "schema_version": "version of this table's columns",
        "audited_at": "when the verdict was decided (UTC)",
        "explanation": "one paragraph a person can read",
        "json": "the whole verdict document (verdicts/SUSPECT.json)",
    },
    "relations": {
        "suspect": "suspect model name",
        "other": "the related model: a candidate or another suspect",
        "other_role": "candidate or suspect",
        "kind": "parent, alias, screened_out, related (candidates; related: a derived suspect that names no parent); copy, derivative (other suspects)",
        "weight": "a parent's weight in the verdict; a related candidate's weight in the blend over them",
        "z": "screening z of a screened-out candidate; median z of a related candidate; median delta z between two suspects",
        "corr": "median correlation of a related candidate; of the two suspects' deltas from the reference candidate",
        "matrices": "matrices the relation was measured on",
    },
    "pairs": {
        "tensor": "canonical tensor name",
        "a": "one suspect",
        "b": "the other suspect",
        "rel_dist": "|a - b| / |a| on the sampled rows",
        "exact_frac": "fraction of bit-equal elements",
        "within_rounding": "rel_dist within the storage rounding of the two dtypes",
        "delta_corr": "correlation of what the candidates both derive from do not explain of a and of b (of a and b when none)",
        "delta_z": "that covariance in standard deviations of its permutation null",
    },
}
VERSIONS = {"tensors": None, "verdicts": VERDICTS_VERSION, "relations": RELATIONS_VERSION, "pairs": RELATIONS_VERSION}


def with_docs(schema: pa.Schema, dataset: str) -> pa.Schema:
    """`schema` with every field's description and the dataset's versions as metadata;
    ValueError if a column has no description (no undocumented columns)."""
    docs = DOCS[dataset]
    missing = [f.name for f in schema if f.name not in docs]
    if missing:
        raise ValueError(f"{dataset}: undocumented columns {missing} (lineage/schema.py)")
    version = VERSIONS[dataset]
    if version is None:
        from lineage.rows import ROWS_VERSION

        version = ROWS_VERSION
    fields = [f.with_metadata({"description": docs[f.name]}) for f in schema]
    return pa.schema(
        fields,
        metadata={"lineage.dataset": dataset, "lineage.schema_version": str(version), "lineage.version": __version__},
    )
