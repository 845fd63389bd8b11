"""Split the audit into byte-balanced units of work.

The cost of a group is the bytes a worker reads for it (suspect plus every
paired candidate). Groups larger than `max_item_bytes` are cut into row
ranges, whose statistics add up exactly (`Stats.merge`), so one 8 GiB
expert tensor can be spread across workers. Items are then packed into
units by longest-processing-time-first: each goes to the currently lightest
unit, which keeps units within a few percent of each other when items are
small against a unit.

The refiners' work (sampled comparisons of other layers, permutation
searches) is packed the same way (`pack`), so it runs on the same workers,
bounded the same way.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

from lineage.align import Group


@dataclass(frozen=True, slots=True)
class Item:
    """Rows [row0, row1) of group `gid`, part `part` of `parts`."""

    gid: int
    group: Group
    row0: int
    row1: int
    part: int
    parts: int
    nbytes: int
    #: the fraction of rows read, when not the audit's (a refiner's sampled comparison)
    sample_fraction: float | None = None


@dataclass(frozen=True, slots=True)
class SharedItem:
    """Rows [row0, row1) of several suspects' groups that pair with the same candidate
    views (a bulk audit): the worker reads each candidate row once, fits every suspect
    against it, and compares the suspects with each other on a sample (relations)."""

    gids: tuple[int, ...]
    groups: tuple[Group, ...]
    row0: int
    row1: int
    part: int
    parts: int
    nbytes: int
    sample_fraction: float | None = None
    relations: bool = True  # compare the suspects with each other too (not while screening)

    @property
    def gid(self) -> int:
        return self.gids[0]


@dataclass(frozen=True)
class Unit:
    uid: int
    items: tuple[Any, ...]  # Item, or another work item with `nbytes` and `run(reader, opts)`

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)


def items_of(
    groups: list[Group | None], max_item_bytes: int, share: bool = True, sample_fraction: float | None = None
) -> list[Item | SharedItem]:
    """Work items for every comparable group (None: nothing to do), big ones split by rows.

    With `share`, the groups of several suspects for one tensor (same
    canonical name and shape, split into the same number of row ranges)
    become one SharedItem when their candidates' views agree wherever they
    name the same candidate: the worker reads the union of their candidates
    once and fits each suspect against its own. Rows are split as for one
    suspect (by its bytes with its candidates'), so each suspect's
    statistics are the ones its own audit would compute. `sample_fraction`:
    rows read, when not the audit's (screening)."""
    buckets: list[tuple[tuple, dict[str, object], list[int]]] = []
    index: dict[tuple, list[int]] = {}
    for gid, g in enumerate(groups):
        if g is None or g.status != "ok" or g.view is None:
            continue
        rows = g.view.rows
        parts = max(1, min(rows, math.ceil(g.nbytes / max_item_bytes)))
        key = (g.canonical, rows, g.view.cols, parts) if share else (gid,)
        views = {s.candidate: s.view for s in g.paired}
        for b in index.get(key, []):
            have = buckets[b][1]
            if all(have.get(n, v) == v for n, v in views.items()):
                have.update(views)
                buckets[b][2].append(gid)
                break
        else:
            index.setdefault(key, []).append(len(buckets))
            buckets.append((key, dict(views), [gid]))
    out: list[Item | SharedItem] = []
    for _, views, gids in buckets:
        g = groups[gids[0]]
        assert g is not None and g.view is not None
        nb, rows = g.nbytes, g.view.rows
        total = sum(v.nbytes for v in views.values()) + sum(groups[i].view.nbytes for i in gids)  # type: ignore[union-attr]
        parts = max(1, min(rows, math.ceil(nb / max_item_bytes)))
        cuts = [rows * k // parts for k in range(parts + 1)]
        for k in range(parts):
            r0, r1 = cuts[k], cuts[k + 1]
            if len(gids) == 1:
                out.append(Item(gids[0], g, r0, r1, k, parts, nb * (r1 - r0) // rows, sample_fraction))
            else:
                gs = tuple(groups[i] for i in gids)
                rel = sample_fraction is None
                out.append(SharedItem(tuple(gids), gs, r0, r1, k, parts, total * (r1 - r0) // rows, sample_fraction, rel))  # type: ignore[arg-type]
    return out


def plan_units(groups: list[Group | None], unit_bytes: int, min_units: int = 1, max_item_bytes: int | None = None) -> list[Unit]:
    """Pack the groups' items into about total/unit_bytes units (at least `min_units`)."""
    return pack(items_of(groups, max_item_bytes or unit_bytes), unit_bytes, min_units)


#: Most items in one unit: a unit's results travel back as one list, and a model
#: of a million tiny tensors must not send them in one.
MAX_UNIT_ITEMS = 4096


def pack(items: list, unit_bytes: int, min_units: int = 1) -> list[Unit]:
    """Work items (anything with `nbytes`) into about total/unit_bytes units, heaviest first."""
    if not items:
        return []
    total = sum(i.nbytes for i in items)
    n = max(min_units, math.ceil(total / max(unit_bytes, 1)), math.ceil(len(items) / MAX_UNIT_ITEMS))
    n = min(n, len(items))
    heap = [(0, u) for u in range(n)]
    bins: list[list[Item]] = [[] for _ in range(n)]
    for it in sorted(items, key=lambda i: -i.nbytes):
        load, u = heapq.heappop(heap)
        bins[u].append(it)
        heapq.heappush(heap, (load + it.nbytes, u))
    return [Unit(u, tuple(sorted(b, key=_order))) for u, b in enumerate(bins)]


def _order(item: Any) -> tuple:
    """Items of a unit in plan order (fit items by group and part; others as planned)."""
    return (getattr(item, "gid", 0), getattr(item, "part", 0))


def imbalance(units: list[Unit]) -> float:
    """max/mean - 1 of unit bytes: 0.05 means the heaviest is 5% above the mean."""
    loads = [u.nbytes for u in units]
    if not loads:
        return 0.0
    mean = sum(loads) / len(loads)
    return max(loads) / mean - 1 if mean else 0.0
