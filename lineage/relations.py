"""Suspects compared with each other, in the same pass as their fits (bulk audits).

When several suspects pair with the same candidate tensor, the worker that
reads it has every suspect's rows at hand. It loads a small sample of rows
of each suspect (RELATION_ELEMENTS in all per tensor, fewer when there are
many suspects, so the work stays about linear in their number) together
with the reference candidate's, once, and compares every pair from memory
with the same kernel as the fit: each suspect against the reference and up
to seven other suspects at a time. Per pair and matrix that gives:

- the relative distance and the fraction of bit-equal elements of the raw
  weights (a copy: within storage rounding everywhere);
- the correlation of what the candidates they both derive from do not
  explain of them (each suspect's residual after its least-squares fit on
  those candidates' affine span; the candidates chosen from each suspect's
  z against every candidate on the same rows), with its z against the
  permutation null (null.py): a suspect made from another (fine-tuned,
  merged from it) carries its residual, where two independent fine-tunes
  of one candidate, or two blends of the same candidates, share none of
  theirs. Suspects that derive from no common candidate are compared on
  their weights themselves (two fine-tunes of a model outside the pool
  correlate; unrelated uploads do not).

The reducer aggregates over matrices: `copy` when every compared matrix is
within rounding, `derivative` when the deltas correlate at RELATION_CORR or
more on median and significantly on most matrices. Which one came first
cannot be told from the weights; the relation says they share a lineage
that the candidates do not explain.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lineage.dtypes import rounding_tolerance
from lineage.fit import Forms, single
from lineage.null import null_sd
from lineage.schema import with_docs
from lineage.stats import Stats

#: Elements per tensor each suspect contributes to the comparison (two sample blocks);
#: scaled down past 16 suspects so the pairs' work stays about linear in their number.
RELATION_ELEMENTS = 1 << 18
MIN_RELATION_ELEMENTS = 1 << 14
#: Median delta correlation from which one suspect counts as a derivative of another.
RELATION_CORR = 0.5
#: z (permutation null) of the delta correlation that counts as significant on a matrix...
RELATION_Z = 6.0
#: ...on at least this fraction of the compared matrices.
RELATION_FRAC = 0.5


@dataclass
class RelationResult:
    """One suspect's sampled rows of one tensor against the reference and other suspects."""

    tensor: str
    suspect: str
    stats: Stats  # order: [the basis candidates..., other suspects...]
    dtypes: dict[str, str]
    basis: list[str] = field(default_factory=list)  # the candidates both suspects derive from


def relation_elements(n_suspects: int) -> int:
    return max(MIN_RELATION_ELEMENTS, RELATION_ELEMENTS * 16 // max(16, n_suspects))


def pair_metrics(r: RelationResult) -> list[tuple[str, str, dict]]:
    """(suspect, other, metrics) for each other suspect in a result."""
    st = r.stats
    f = Forms(st)
    basis = r.basis
    u = unexplained(f, "suspect", basis)
    out = []
    for b in st.order[len(basis) :]:
        sg = single(st, b)
        v = unexplained(f, b, basis)
        n = st.n
        cov = f.dot(u, v) - f.total(u) * f.total(v) / n
        su = f.dot(u, u) - f.total(u) ** 2 / n
        sv = f.dot(v, v) - f.total(v) ** 2 / n
        corr = cov / math.sqrt(su * sv) if su > 0 and sv > 0 else float("nan")
        sd = null_sd(st, u, v)
        tol = rounding_tolerance(r.dtypes[r.suspect], r.dtypes[b]) or 0.0
        out.append(
            (
                r.suspect,
                b,
                {
                    "rel_dist": sg.rel_dist,
                    "exact_frac": sg.exact_frac,
                    "within_rounding": sg.rel_dist <= tol,
                    "delta_corr": corr,
                    "delta_z": cov / sd if sd > 0 else float("nan"),
                },
            )
        )
    return out


#: One row per (pair of suspects, tensor): `OUTPUT_DIR/pairs/part-*.parquet`, written as
#: results arrive, so a resumed audit keeps the comparisons of tensors already done.
PAIR_SCHEMA = with_docs(
    pa.schema(
        [
            ("tensor", pa.string()),
            ("a", pa.string()),
            ("b", pa.string()),
            ("rel_dist", pa.float64()),
            ("exact_frac", pa.float64()),
            ("within_rounding", pa.bool_()),
            ("delta_corr", pa.float64()),
            ("delta_z", pa.float64()),
        ]
    ),
    "pairs",
)
PAIRS = "pairs"


def unexplained(f: Forms, who: str, basis: list[str]) -> np.ndarray:
    """Coefficients (over the stored columns) of what the affine span of the `basis`
    candidates does not explain of `who`: `who - c1` minus its least-squares fit on
    `c_j - c1`. With no basis, `who` itself; with one, its delta from it."""
    if not basis:
        return f.vec(who)
    u = f.diff(who, basis[0])
    if len(basis) == 1:
        return u
    X = np.stack([f.diff(c, basis[0]) for c in basis[1:]], axis=1)
    A = X.T @ f.g @ X
    try:
        beta = np.linalg.solve(A, X.T @ f.g @ u)
    except np.linalg.LinAlgError:
        beta = np.linalg.lstsq(A, X.T @ f.g @ u, rcond=None)[0]
    return u - X @ beta


@dataclass
class Relations:
    """Pairwise evidence gathered over a bulk audit's matrices, then classified."""

    per_pair: dict[tuple[str, str], list[dict]] = field(default_factory=lambda: defaultdict(list))
    pending: list[dict] = field(default_factory=list)  # rows not yet written to pairs/

    def add(self, r: RelationResult) -> None:
        """Rows to write (the reducer's side; the verdicts read them back with `load`)."""
        for a, b, m in pair_metrics(r):
            self.pending.append({"tensor": r.tensor, "a": a, "b": b, **m})

    def flush(self, out_dir) -> None:
        """Write the rows gathered since the last flush as one atomic part file."""
        from pathlib import Path

        from lineage.output import atomic_write_table, parts

        if not self.pending:
            return
        folder = Path(out_dir) / PAIRS
        seq = max((i + 1 for i, _ in parts(folder)), default=0)
        atomic_write_table(folder / f"part-{seq:06d}.parquet", pa.Table.from_pylist(self.pending, schema=PAIR_SCHEMA))
        self.pending = []

    @classmethod
    def load(cls, out_dir) -> Relations:
        """Every pair row an audit (and the runs it resumed) wrote."""
        from pathlib import Path

        from lineage.output import parts

        rel = cls()
        for _, p in parts(Path(out_dir) / PAIRS):
            try:
                rows = pq.read_table(p, schema=PAIR_SCHEMA).to_pylist()
            except (OSError, pa.ArrowException):
                continue  # a part a kill cut short: relations are evidence, not rows to account for
            for row in rows:
                a, b = row.pop("a"), row.pop("b")
                row.pop("tensor")
                rel.per_pair[tuple(sorted((a, b)))].append(row)  # type: ignore[index]
        return rel

    def pairs(self) -> list[dict]:
        """Every related pair: {a, b, kind, matrices, median_delta_corr, frac_significant, ...}."""
        out = []
        for (a, b), ms in sorted(self.per_pair.items()):
            corr = [m["delta_corr"] for m in ms if not math.isnan(m["delta_corr"])]
            zs = [m["delta_z"] for m in ms if not math.isnan(m["delta_z"])]
            med = float(np.median(corr)) if corr else float("nan")
            frac = sum(z >= RELATION_Z for z in zs) / len(zs) if zs else 0.0
            if all(m["within_rounding"] for m in ms):
                kind = "copy"
            elif med >= RELATION_CORR and frac >= RELATION_FRAC:
                kind = "derivative"
            else:
                continue
            out.append(
                {
                    "a": a,
                    "b": b,
                    "kind": kind,
                    "matrices": len(ms),
                    "median_delta_corr": round(med, 6),
                    "frac_significant": round(frac, 6),
                    "median_delta_z": round(float(np.median(zs)), 3) if zs else None,
                    "median_rel_dist": float(np.median([m["rel_dist"] for m in ms])),
                    "median_exact_frac": float(np.median([m["exact_frac"] for m in ms])),
                }
            )
        return out

    def of(self, suspect: str) -> list[dict]:
        """The relations of one suspect, as its verdict reports them."""
        out = []
        for p in self.pairs():
            if suspect in (p["a"], p["b"]):
                other = p["b"] if p["a"] == suspect else p["a"]
                out.append({"suspect": other, **{k: v for k, v in p.items() if k not in ("a", "b")}})
        return out
