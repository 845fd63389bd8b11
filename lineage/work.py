"""What a worker does with one unit: read its bytes, return small results.

A plain function, so tests, `run_local` and the Ray tasks and actors call
the same code. A unit holds fit items (plan.Item: rows of one comparison
into Stats) and, after the fit, refiners' items (sampled comparisons of
other layers, which are fit items too; permutation searches, which carry
their own `run`). Each item fails alone: a read or decode problem becomes
an error string for that tensor, and the rest of the unit carries on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from lineage.dtypes import DTYPES
from lineage.engines import accumulate
from lineage.errors import LineageError, where
from lineage.geometry import pieces
from lineage.options import FitOptions
from lineage.plan import Item, Unit
from lineage.reader import Reader
from lineage.remote import is_remote
from lineage.sampling import block_rows, sample_ranges
from lineage.stats import Stats

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
    stats: Stats | None
    error: str | None


def run_unit(unit: Unit, opts: FitOptions) -> list:
    """Every item of `unit`, in order: an ItemResult per fit item, whatever other items return."""
    with Reader(remote=opts.remote) as reader:
        reader.expect(remote_ranges(unit, opts))
        return [run_item(it, reader, opts) if isinstance(it, Item) else it.run(reader, opts) for it in unit.items]


def remote_ranges(unit: Unit, opts: FitOptions) -> dict[str, list[tuple[int, int]]]:
    """Per remote file, the byte ranges `unit` will read: its rows (sampled as the engine
    samples them) of every side, and the FP8 block scales beside them."""
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for it in unit.items:
        if isinstance(it, Item) and it.group.view is not None:
            g = it.group
            frac = opts.sample_fraction if it.sample_fraction is None else it.sample_fraction
            rows = sample_ranges(it.row0, it.row1, block_rows(g.view.cols), frac, g.tensor)
            views = [g.view] + [s.view for s in g.paired]
        else:
            views = [v for _, sv, pv, _ in getattr(it, "mats", ()) for v in (sv, pv)]
            rows = None
        for v in views:
            for a, b in rows or [(0, v.rows)]:
                for seg, r0, r1 in pieces(v, a, b):
                    if is_remote(seg.path):
                        rb = seg.cols * DTYPES[seg.dtype].itemsize
                        out[seg.path].append((seg.start + r0 * rb, seg.start + r1 * rb))
                    sc = seg.scale
                    if sc is not None and is_remote(sc.path):
                        out[sc.path].append((sc.start, sc.start + sc.rows * sc.cols * DTYPES[sc.dtype].itemsize))
    return dict(out)


def run_item(it: Item, reader: Reader, opts: FitOptions) -> ItemResult:
    try:
        o = opts if it.sample_fraction is None else opts.with_(sample_fraction=it.sample_fraction)
        st = accumulate(it.group, reader, o, (it.row0, it.row1))
        if not st.nonfinite and not st.finite(MAX_STAT):
            return ItemResult(
                it.gid,
                it.part,
                it.parts,
                None,
                f"{_where(it)}: values too large for float64 statistics (sums of squares above {MAX_STAT:.0e})",
            )
        if it.parts == 1:
            st.fold()
        return ItemResult(it.gid, it.part, it.parts, st, None)
    except LineageError as e:
        return ItemResult(it.gid, it.part, it.parts, None, str(e))
    except (ValueError, RuntimeError, OSError) as e:  # decode trouble from torch; keep the audit going
        return ItemResult(it.gid, it.part, it.parts, None, f"{_where(it)}: {type(e).__name__}: {e}")


def _where(it: Item) -> str:
    """`file [tensor]` of the suspect side, the prefix of every message."""
    v = it.group.view
    return where(v.segments[0].path if v is not None else "?", it.group.tensor)
