"""A suspect's stored rows, read back column by column for its verdict.

Rows are read from the Parquet dataset in record batches, never as one
dict per row with every list in it: the scalar columns become small `Row`
objects, each row's per-candidate results `Cand` objects, and the stored
statistics (`stats_*`) stacked numpy arrays, one stack per candidate order,
from which a row's `Stats` is a view made on demand (stats.from_columns is
the same codec, one row at a time). A model of a million tensors then
costs the driver a few hundred MB here, not the several GB that a list of
row dicts took.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lineage.output import partition_dir, parts
from lineage.rows import SCHEMA
from lineage.stats import Stats

#: Rows converted at a time: bounds the Arrow memory of a huge model to one batch.
BATCH_ROWS = 16384
SCALARS = ("tensor", "layer", "component", "ndim", "numel", "status", "reason", "bytes_read", "elements")
#: The fields of a `candidates` entry the explanations read (the others stay in the dataset).
CAND_FIELDS = ("candidate", "dtype", "status", "corr", "rel_dist", "near_frac", "z", "rounding_tol")
#: Text columns whose values repeat from row to row: one string object per distinct value.
REPEATED = ("component", "status", "candidate", "dtype")


@dataclass(slots=True)
class Cand:
    """One candidate's single-parent results for one suspect tensor (a `candidates` entry)."""

    candidate: str
    dtype: str | None
    status: str
    corr: float | None
    rel_dist: float | None
    near_frac: float | None
    z: float | None
    rounding_tol: float | None


class _Stack:
    """Stored statistics of the rows that share one candidate order, stacked."""

    def __init__(self, order: tuple[str, ...]) -> None:
        self.order = list(order)
        self.parts: list[dict[str, np.ndarray]] = []
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, batch: pa.Table) -> int:
        """Append a batch of rows of this order; return the index of its first row."""
        m = len(self.order) + 1
        k = len(self.order)
        start = sum(len(p["n"]) for p in self.parts)
        r = batch.num_rows

        def flat(col: str, width: int, dtype=np.float64) -> np.ndarray:
            return pc.list_flatten(batch.column(col)).to_numpy(zero_copy_only=False).astype(dtype).reshape(r, width)

        self.parts.append(
            {
                "n": batch.column("elements").to_numpy(zero_copy_only=False).astype(np.int64),
                "cols": batch.column("stats_cols").to_numpy(zero_copy_only=False).astype(np.int64),
                "gram": flat("stats_gram", m * m).reshape(r, m, m),
                "sums": flat("stats_sums", m),
                "exact": flat("stats_exact", k, np.int64),
                "near": flat("stats_near", k, np.int64),
                "dropped": flat("stats_dropped", k),
                "rowgram": flat("stats_rowgram", m * m).reshape(r, m, m),
                "colgram": flat("stats_colgram", m * m).reshape(r, m, m),
            }
        )
        return start

    def seal(self) -> None:
        self.arrays = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        self.parts = []

    def stats(self, i: int) -> Stats:
        a = self.arrays
        return Stats(
            order=self.order,
            n=int(a["n"][i]),
            gram=a["gram"][i],
            sums=a["sums"][i],
            exact=[int(x) for x in a["exact"][i]],
            near=[int(x) for x in a["near"][i]],
            dropped=[float(x) for x in a["dropped"][i]],
            cols=int(a["cols"][i]),
            rowgram=a["rowgram"][i],
            colgram_=a["colgram"][i],
        )


@dataclass(slots=True)
class Row:
    """One suspect tensor's stored result (the scalar columns, its candidates, its statistics)."""

    tensor: str
    layer: int | None
    component: str
    ndim: int
    numel: int
    status: str
    reason: str
    bytes_read: int
    elements: int
    cands: list[Cand]
    stack: _Stack | None = None
    index: int = -1

    @property
    def order(self) -> list[str]:
        return self.stack.order if self.stack is not None else []

    @property
    def stats(self) -> Stats | None:
        """The row's Stats, a view on the stacked arrays (made on demand, not kept)."""
        return self.stack.stats(self.index) if self.stack is not None else None

    def cand(self, name: str) -> Cand | None:
        return next((c for c in self.cands if c.candidate == name), None)


def load_rows(out_dir: Path, suspect: str) -> list[Row]:
    """A suspect's rows, in dataset order (part files in sequence, rows in file order)."""
    rows: list[Row] = []
    stacks: dict[tuple[str, ...], _Stack] = {}
    for _, path in parts(partition_dir(out_dir, suspect)):
        f = pq.ParquetFile(path)
        for rb in f.iter_batches(batch_size=BATCH_ROWS):
            batch = pa.Table.from_batches([rb]).cast(pa.schema([SCHEMA.field(n) for n in rb.schema.names]))
            rows.extend(_rows_of(batch, stacks))
    for st in stacks.values():
        st.seal()
    pa.default_memory_pool().release_unused()  # the batches are gone: give their pages back
    return rows


def _column(table_or_struct, name: str, strings: dict) -> list:
    """A column as Python values; repeated text shares one object per distinct value."""
    values = (
        table_or_struct.field(name).to_pylist()
        if isinstance(table_or_struct, pa.StructArray)
        else table_or_struct.column(name).to_pylist()
    )
    if name in REPEATED:
        values = [strings.setdefault(v, v) for v in values]
    return values


def _rows_of(batch: pa.Table, stacks: dict[tuple[str, ...], _Stack]) -> list[Row]:
    strings: dict = {}
    scal = {c: _column(batch, c, strings) for c in SCALARS}
    scal["reason"] = [r if st != "ok" else "" for r, st in zip(scal["reason"], scal["status"])]
    cands_col = batch.column("candidates").combine_chunks()
    offsets = cands_col.offsets.to_numpy() if batch.num_rows else np.zeros(1, dtype=np.int64)
    offsets = offsets - offsets[0]
    flat = pc.list_flatten(cands_col)
    fields = {f: _column(flat, f, strings) if len(flat) else [] for f in CAND_FIELDS}
    cands = [Cand(*vals) for vals in zip(*(fields[f] for f in CAND_FIELDS))]
    out = [
        Row(
            scal["tensor"][i],
            scal["layer"][i],
            scal["component"][i],
            scal["ndim"][i],
            scal["numel"][i],
            scal["status"][i],
            scal["reason"][i],
            scal["bytes_read"][i],
            scal["elements"][i],
            cands[offsets[i] : offsets[i + 1]],
        )
        for i in range(batch.num_rows)
    ]
    orders = batch.column("stats_order").to_pylist()
    by_order: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, o in enumerate(orders):
        if o:
            by_order[tuple(o)].append(i)
    for order, idx in by_order.items():
        stack = stacks.setdefault(order, _Stack(order))
        start = stack.add(batch.take(pa.array(idx)))
        for j, i in enumerate(idx):
            out[i].stack, out[i].index = stack, start + j
    return out
