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

import numpy as np

from lineage.dtypes import DTYPES, view_tolerance
from lineage.engines import accumulate, accumulate_shared
from lineage.errors import LineageError, where
from lineage.explain.thresholds import Z_SIG
from lineage.fit import single
from lineage.geometry import pieces
from lineage.options import FitOptions
from lineage.plan import Item, SharedItem, Unit
from lineage.reader import Reader
from lineage.relations import RelationResult
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
    #: bytes this result accounts for reading: its stats' for an item read alone; for
    #: the suspects of a shared item, the whole item's on the first and 0 on the others
    #: (the candidates were read once for all of them)
    read: int = 0


def run_unit(unit: Unit, opts: FitOptions) -> list:
    """Every item of `unit`, in order: an ItemResult per fit item (one per suspect of a
    shared item, then the suspects' RelationResults), whatever other items return."""
    out: list = []
    with Reader(remote=opts.remote) as reader:
        reader.expect(remote_ranges(unit, opts))
        for it in unit.items:
            if isinstance(it, Item):
                out.append(run_item(it, reader, opts))
            elif isinstance(it, SharedItem):
                out.extend(run_shared(it, reader, opts))
            else:
                out.append(it.run(reader, opts))
    return out


def run_shared(it: SharedItem, reader: Reader, opts: FitOptions) -> list:
    """Every suspect of a shared item, the candidates read once; then their relations."""
    o = opts if it.sample_fraction is None else opts.with_(sample_fraction=it.sample_fraction)
    before = reader.bytes_read
    compare = it.relations and it.part == 0 and len(it.groups[0].shape) >= 2
    keep: list | None = [] if compare else None
    try:
        stats = accumulate_shared(list(it.groups), reader, o, (it.row0, it.row1), keep=keep)
    except LineageError as e:
        return [ItemResult(gid, it.part, it.parts, None, str(e)) for gid in it.gids]
    except (ValueError, RuntimeError, OSError) as e:
        return [
            ItemResult(gid, it.part, it.parts, None, f"{_where_g(g)}: {type(e).__name__}: {e}")
            for gid, g in zip(it.gids, it.groups)
        ]
    out: list = [_result(gid, g, it.part, it.parts, st) for gid, g, st in zip(it.gids, it.groups, stats)]
    for r in out[1:]:
        r.read = 0  # the item's reads are counted once, on the first suspect
    out[0].read = reader.bytes_read - before
    if keep:
        out.extend(compare_suspects(it, keep, o))
    return out


def _result(gid: int, g, part: int, parts: int, st: Stats) -> ItemResult:
    if not st.nonfinite and not st.finite(MAX_STAT):
        path = g.view.segments[0].path if g.view is not None else "?"
        return ItemResult(
            gid,
            part,
            parts,
            None,
            f"{where(path, g.tensor)}: values too large for float64 statistics (sums of squares above {MAX_STAT:.0e})",
        )
    if parts == 1:
        st.fold()
    return ItemResult(gid, part, parts, st, None, st.bytes_read)


def compare_suspects(it: SharedItem, sample: list[np.ndarray], opts: FitOptions) -> list[RelationResult]:
    """The suspects of `it` against each other (relations.py) on the rows the fit kept:
    `sample` holds every candidate's leading rows, then every suspect's.

    Each suspect is first compared with every candidate; each pair of
    suspects is then compared on what the candidates both derive from do
    not explain (relations.pair_metrics), or on their raw weights when they
    share none."""
    from lineage.engines import candidate_union, kernel

    union, views, _, _ = candidate_union(list(it.groups), opts.base)
    k, n = len(union), len(it.groups)
    if kernel._kernel is None or len(sample) != k + n:
        return []
    g0 = it.groups[0]
    assert g0.view is not None
    cols, names = g0.view.cols, [g.suspect for g in it.groups]
    dtypes = {g.suspect: g.dtype for g in it.groups} | {c: v.dtype for c, v in zip(union, views)}
    data = dict(zip(union + names, sample))
    if len({x.dtype for x in data.values()}) > 1:  # BF16 bits beside float32: compare all as float32 (same bits)
        data = {key: (x.astype(np.uint32) << 16).view(np.float32) if x.dtype == np.uint16 else x for key, x in data.items()}
    batch = kernel._kernel.MAX_CANDIDATES

    def stats(a: str, others: list[str]):
        tols = np.array([view_tolerance(dtypes[a], dtypes[o]) for o in others])
        return kernel.stats_of_arrays([data[a]] + [data[o] for o in others], others, tols, cols)

    related: dict[str, dict[str, float]] = {}  # suspect -> candidate -> rel_dist, where significantly related
    for a in names:
        related[a] = {}
        for lo in range(0, k, batch):
            st = stats(a, union[lo : lo + batch])
            for c in union[lo : lo + batch]:
                sg = single(st, c)
                if sg.z >= Z_SIG:
                    related[a][c] = sg.rel_dist
    by_basis: dict[tuple[str, ...], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for i, a in enumerate(names):
        for b in names[:i]:
            common = sorted(related[a].keys() & related[b].keys(), key=lambda c: related[a][c] + related[b][c])
            by_basis[tuple(common[: batch - 1])][a].append(b)
    out = []
    for basis, pairs in by_basis.items():
        for a, others in pairs.items():
            step = batch - len(basis)
            for lo in range(0, len(others), step):
                chunk = others[lo : lo + step]
                out.append(RelationResult(g0.canonical, a, stats(a, [*basis, *chunk]), dtypes, list(basis)))
    return out


def remote_ranges(unit: Unit, opts: FitOptions) -> dict[str, list[tuple[int, int]]]:
    """Per remote file, the byte ranges `unit` will read: its rows (sampled as the engine
    samples them) of every side, and the FP8 block scales beside them."""
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for it in unit.items:
        if (
            isinstance(it, (Item, SharedItem))
            and (g := it.groups[0] if isinstance(it, SharedItem) else it.group).view is not None
        ):
            frac = opts.sample_fraction if it.sample_fraction is None else it.sample_fraction
            rows = sample_ranges(it.row0, it.row1, block_rows(g.view.cols), frac, g.tensor)
            views = [x.view for x in (it.groups if isinstance(it, SharedItem) else [g])] + [s.view for s in g.paired]
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
        return _result(it.gid, it.group, it.part, it.parts, accumulate(it.group, reader, o, (it.row0, it.row1)))
    except LineageError as e:
        return ItemResult(it.gid, it.part, it.parts, None, str(e))
    except (ValueError, RuntimeError, OSError) as e:  # decode trouble from torch; keep the audit going
        return ItemResult(it.gid, it.part, it.parts, None, f"{_where(it)}: {type(e).__name__}: {e}")


def _where(it: Item) -> str:
    return _where_g(it.group)


def _where_g(g) -> str:
    """`file [tensor]` of a group's suspect side, the prefix of every message."""
    return where(g.view.segments[0].path if g.view is not None else "?", g.tensor)
