"""What a worker does with one unit: read its bytes, return small stats.

A plain function, so tests and the Ray task call the same code. Each item
fails alone: a read or decode problem becomes an error string for that
tensor, and the rest of the unit carries on.
"""

from __future__ import annotations

from dataclasses import dataclass

from lineage.errors import LineageError
from lineage.plan import Item, Unit
from lineage.stats import accumulate
from lineage.views import Reader


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
        if it.parts == 1:
            st.fold()
        return ItemResult(it.gid, it.part, it.parts, st.to_dict(), None)
    except LineageError as e:
        return ItemResult(it.gid, it.part, it.parts, None, str(e))
    except (ValueError, RuntimeError, OSError) as e:  # decode trouble from torch; keep the audit going
        return ItemResult(it.gid, it.part, it.parts, None, f"{it.group.tensor}: {type(e).__name__}: {e}")
