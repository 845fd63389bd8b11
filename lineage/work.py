"""What a worker does with one unit: read its bytes, return small stats.

A plain function, so tests and the Ray task call the same code. Each item
fails alone: a read or decode problem becomes an error string for that
tensor, and the rest of the unit carries on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lineage.errors import LineageError, where
from lineage.plan import Item, Unit
from lineage.stats import accumulate
from lineage.views import Reader

#: Largest magnitude a statistic may reach. Sums of squares of real weights
#: are below 1e20; values near 1e300 (finite in float64) would overflow when
#: the fits square them again, so such a tensor becomes an error row naming
#: the problem rather than an overflow in the reducer.
MAX_STAT = 1e200


@dataclass
class ItemResult:
    gid: int
    part: int
    parts: int
    stats: dict | None
    error: str | None


def run_unit(
    unit: Unit,
    chunk_bytes: int,
    base: str | None = None,
    device: str = "cpu",
    sample_fraction: float = 1.0,
    threads: int = 1,
) -> list[ItemResult]:
    """`threads`: the CPU cores this worker was given (the C kernel uses them all)."""
    out = []
    with Reader() as reader:
        for it in unit.items:
            out.append(run_item(it, reader, chunk_bytes, base, device, sample_fraction, threads))
    return out


def run_item(
    it: Item,
    reader: Reader,
    chunk_bytes: int,
    base: str | None,
    device: str = "cpu",
    sample_fraction: float = 1.0,
    threads: int = 1,
) -> ItemResult:
    try:
        st = accumulate(
            it.group,
            reader,
            chunk_bytes,
            (it.row0, it.row1),
            base=base,
            device=device,
            sample_fraction=sample_fraction,
            threads=threads,
        )
        if not st.nonfinite and not all(
            np.isfinite(a).all() and (a.size == 0 or np.abs(a).max() <= MAX_STAT) for a in (st.gram, st.sums, st.rowgram)
        ):
            return ItemResult(
                it.gid,
                it.part,
                it.parts,
                None,
                f"{_where(it)}: values too large for float64 statistics (sums of squares above {MAX_STAT:.0e})",
            )
        if it.parts == 1:
            st.fold()
        return ItemResult(it.gid, it.part, it.parts, st.to_dict(), None)
    except LineageError as e:
        return ItemResult(it.gid, it.part, it.parts, None, str(e))
    except (ValueError, RuntimeError, OSError) as e:  # decode trouble from torch; keep the audit going
        return ItemResult(it.gid, it.part, it.parts, None, f"{_where(it)}: {type(e).__name__}: {e}")


def _where(it: Item) -> str:
    """`file [tensor]` of the suspect side, the prefix of every message."""
    v = it.group.view
    return where(v.segments[0].path if v is not None else "?", it.group.tensor)
