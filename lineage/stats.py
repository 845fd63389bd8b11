"""Sufficient statistics of one comparison, as plain data, and their stored columns.

For a suspect s and paired candidates p_1..p_k a streaming pass (one of the
engines in lineage/engines) accumulates, in float64, the Gram matrix of the
columns

    Y = [ r,  p_2 - r, ..., p_k - r,  s - r ]      (r = p_1, the reference)

plus their sums, the element count and, per candidate, how many elements are
bit-equal to the suspect or within storage rounding of it. Seen as a matrix
(rows x cols), it also keeps the sums of every row and every column of each
Y column: the Gram of the row sums (`rowgram`) and the column sums themselves
(`colsum`, folded into their Gram `colgram` once a tensor is complete). With
them lineage/null.py measures a covariance against its permutation null.
Everything the fit reports (cosines, correlations, distances, single-parent
and blend fits relative to any candidate as base) is a quadratic form in
these numbers, so the bytes are read exactly once.

Why differences from a reference rather than the raw Gram of [p, s]: related
checkpoints differ by a few percent or less, and distances recovered from a
raw Gram (|a|^2 - 2 a.b + |b|^2) lose as many digits as the ratio
|w|^2 / |delta|^2 has. Forming the differences element by element first
keeps the small quantities small from the start; only the reference column
is large.

Stats are additive, so a huge tensor can be split into row ranges across
workers and the partial stats summed exactly (up to float64 addition order).
They travel from workers to the reducer as this object (Ray serialises the
arrays without copies); `to_columns` / `from_columns` are the one codec
between them and the Parquet row's `stats_*` columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Stats:
    order: list[str]  # candidates in column order; order[0] is the reference
    n: int = 0
    gram: np.ndarray = field(default=None)  # type: ignore[assignment]
    sums: np.ndarray = field(default=None)  # type: ignore[assignment]
    exact: list[int] = field(default_factory=list)
    near: list[int] = field(default_factory=list)  # within storage rounding of the suspect
    # per candidate j >= 1: sum of (p_j - r)^2 where the suspect is within rounding of r (entry 0: 0)
    dropped: list[float] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    cols: int = 1  # of the matrix the elements come from (rows = n // cols)
    rowgram: np.ndarray = field(default=None)  # type: ignore[assignment]  # Gram of per-row sums
    colsum: np.ndarray | None = None  # m x cols; None once folded into colgram
    colgram_: np.ndarray | None = None  # Gram of per-column sums, when colsum is gone

    def __post_init__(self) -> None:
        m = len(self.order) + 1
        if self.gram is None:
            self.gram = np.zeros((m, m))
        if self.sums is None:
            self.sums = np.zeros(m)
        if self.rowgram is None:
            self.rowgram = np.zeros((m, m))
        if self.colsum is None and self.colgram_ is None:
            self.colsum = np.zeros((m, self.cols))
        if not self.exact:
            self.exact = [0] * len(self.order)
        if not self.near:
            self.near = [0] * len(self.order)
        if not self.dropped:
            self.dropped = [0.0] * len(self.order)

    def merge(self, other: Stats) -> Stats:
        """Add the stats of another row range of the same comparison.

        New arrays, not in place: stats that came through Ray are read-only views."""
        if other.order != self.order:
            raise ValueError("cannot merge stats of different candidate orders")
        if other.cols != self.cols or self.colsum is None or other.colsum is None:
            raise ValueError("cannot merge stats of different shapes, or already folded")
        self.n += other.n
        self.gram = self.gram + other.gram
        self.sums = self.sums + other.sums
        self.rowgram = self.rowgram + other.rowgram
        self.colsum = self.colsum + other.colsum
        self.exact = [a + b for a, b in zip(self.exact, other.exact)]
        self.near = [a + b for a, b in zip(self.near, other.near)]
        self.dropped = [a + b for a, b in zip(self.dropped, other.dropped)]
        for k, v in other.nonfinite.items():
            self.nonfinite[k] = self.nonfinite.get(k, 0) + v
        self.bytes_read += other.bytes_read
        return self

    @property
    def rows(self) -> int:
        return self.n // self.cols

    @property
    def colgram(self) -> np.ndarray:
        return self.colsum @ self.colsum.T if self.colsum is not None else self.colgram_  # type: ignore[return-value]

    def fold(self) -> Stats:
        """Replace the column sums by their Gram: small, but no longer mergeable.

        Done for a tensor read whole, so only row ranges of split tensors
        carry cols floats per column of Y to the reducer."""
        if self.colsum is not None:
            self.colgram_, self.colsum = self.colgram, None
        return self

    def finite(self, limit: float) -> bool:
        """Every accumulated sum is finite and at most `limit` in magnitude."""
        return all(
            np.isfinite(a).all() and (a.size == 0 or np.abs(a).max() <= limit) for a in (self.gram, self.sums, self.rowgram)
        )


#: The Parquet columns that hold a Stats (see rows.SCHEMA), in the codec's order.
COLUMNS = (
    "elements",
    "stats_order",
    "stats_gram",
    "stats_sums",
    "stats_exact",
    "stats_near",
    "stats_dropped",
    "stats_cols",
    "stats_rowgram",
    "stats_colgram",
)


def to_columns(st: Stats) -> dict:
    """The stored columns of a complete (folded or whole) Stats."""
    return {
        "elements": st.n,
        "stats_order": st.order,
        "stats_gram": st.gram.flatten().tolist(),
        "stats_sums": st.sums.tolist(),
        "stats_exact": st.exact,
        "stats_near": st.near,
        "stats_dropped": st.dropped,
        "stats_cols": st.cols,
        "stats_rowgram": st.rowgram.flatten().tolist(),
        "stats_colgram": st.colgram.flatten().tolist(),
    }


def from_columns(row: dict) -> Stats | None:
    """The Stats stored in a row's columns (None when the row has none)."""
    order = row.get("stats_order")
    if not order:
        return None
    m = len(order) + 1

    def mat(x) -> np.ndarray:
        return np.array(x, dtype=np.float64).reshape(m, -1)

    return Stats(
        order=list(order),
        n=int(row["elements"]),
        gram=mat(row["stats_gram"]),
        sums=np.array(row["stats_sums"], dtype=np.float64),
        exact=[int(x) for x in row["stats_exact"]],
        near=[int(x) for x in row.get("stats_near") or []],
        dropped=[float(x) for x in row.get("stats_dropped") or []],
        cols=int(row.get("stats_cols") or 1),
        rowgram=mat(row["stats_rowgram"]),
        colgram_=mat(row["stats_colgram"]),
    )
