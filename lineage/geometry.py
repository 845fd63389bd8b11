"""Row views over tensors on disk: what one side of a comparison reads.

Every comparison in lineage is between two *views* with the same number of
rows and columns. A view is a list of row ranges of real tensors, each seen
as a 2-D matrix (`[..., rows, cols]` flattened to `[prod(...)*rows, cols]`;
1-D as `[n, 1]`). That one shape covers renamed copies (one whole tensor),
fused versus per-expert experts (2E per-expert matrices against the rows of
one fused tensor), and vocabularies of different sizes (the common rows).
This module is geometry only: which bytes; reading them is reader.py, and
turning them into numbers is decode.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lineage.dtypes import DTYPES
from lineage.errors import LineageError
from lineage.files import Stamp
from lineage.header import TensorEntry
from lineage.layout import FP8_BLOCK


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a tensor seen as a matrix."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    return math.prod(shape[:-1]), shape[-1]


@dataclass(frozen=True, slots=True)
class Scale:
    """An FP8 block-scale tensor: one F32/BF16 factor per FP8_BLOCK x FP8_BLOCK block."""

    path: str
    name: str
    dtype: str
    start: int
    rows: int  # rows of the scale seen as a matrix
    cols: int
    stamp: Stamp | None = None


@dataclass(frozen=True, slots=True)
class Segment:
    """Rows [row0, row1) of one tensor on disk, seen as a matrix."""

    path: str
    name: str
    dtype: str
    start: int  # byte offset of the tensor's first element
    cols: int
    row0: int
    row1: int
    inner_rows: int  # rows of one 2-D slice (shape[-2]); FP8 blocks restart per slice
    scale: Scale | None = None
    stamp: Stamp | None = None  # the file as planned: a worker refuses it if it changed

    @property
    def rows(self) -> int:
        return self.row1 - self.row0

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * DTYPES[self.dtype].itemsize


@dataclass(frozen=True, slots=True)
class View:
    """Rows of one or more segments stacked: what one side of a comparison reads."""

    segments: tuple[Segment, ...]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def cols(self) -> int:
        return self.segments[0].cols

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    @property
    def dtype(self) -> str:
        """The dtype of the view; 'mixed' if its segments differ."""
        kinds = {s.dtype for s in self.segments}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def label(self) -> str:
        """A name for messages: the tensor, or the first and the count."""
        names = list(dict.fromkeys(s.name for s in self.segments))
        return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"


def segment(entry: TensorEntry, scale: TensorEntry | None = None, rows: tuple[int, int] | None = None) -> Segment:
    """A segment over `entry` (all rows unless `rows` is given)."""
    r, c = matrix_shape(entry.shape)
    inner = entry.shape[-2] if len(entry.shape) >= 2 else r
    sc = None
    if scale is not None:
        sr, scc = matrix_shape(scale.shape)
        sc = Scale(scale.path, scale.name, scale.dtype, scale.start, sr, scc, scale.stamp)
    r0, r1 = rows if rows is not None else (0, r)
    return Segment(entry.path, entry.name, entry.dtype, entry.start, c, r0, r1, inner, sc, entry.stamp)


def check_scale(entry: TensorEntry, scale: TensorEntry) -> None:
    """The scale must have one entry per FP8_BLOCK x FP8_BLOCK block of every 2-D slice."""
    r, c = matrix_shape(entry.shape)
    inner = entry.shape[-2] if len(entry.shape) >= 2 else r
    lead = r // inner if inner else 0
    want_r, want_c = lead * math.ceil(inner / FP8_BLOCK), math.ceil(c / FP8_BLOCK)
    got = matrix_shape(scale.shape)
    if got != (want_r, want_c) or scale.dtype not in ("F32", "BF16", "F16"):
        raise LineageError(
            f"{scale.path} [{scale.name}]: block scale {scale.dtype} {list(scale.shape)} does not fit "
            f"{entry.name} {list(entry.shape)} (expected float [{want_r}, {want_c}] for {FP8_BLOCK}x{FP8_BLOCK} blocks)"
        )


def crop(view: View, rows: int) -> View:
    """The first `rows` rows of a single-segment view (common vocabulary rows)."""
    if view.rows == rows:
        return view
    (seg,) = view.segments
    return View((replace(seg, row1=seg.row0 + rows),))


def locate(view: View, a: int, b: int) -> tuple[Segment, int, int] | None:
    """(segment, file offset, bytes) of rows [a, b) when one segment holds them all."""
    base = 0
    for seg in view.segments:
        if base <= a and b <= base + seg.rows:
            row_bytes = seg.cols * DTYPES[seg.dtype].itemsize
            return seg, seg.start + (seg.row0 + a - base) * row_bytes, (b - a) * row_bytes
        base += seg.rows
        if base >= b:
            break
    return None


def pieces(view: View, a: int, b: int) -> list[tuple[Segment, int, int]]:
    """(segment, first row, end row) of each segment that rows [a, b) of `view` cross,
    rows counted inside the segment's tensor (absolute)."""
    out, base = [], 0
    for seg in view.segments:
        lo, hi = max(a, base), min(b, base + seg.rows)
        if lo < hi:
            out.append((seg, seg.row0 + lo - base, seg.row0 + hi - base))
        base += seg.rows
        if base >= b:
            break
    return out
