"""Row views over tensors on disk, and the byte-range reader behind them.

Every comparison in lineage is between two *views* with the same number of
rows and columns. A view is a list of row ranges of real tensors, each seen
as a 2-D matrix (`[..., rows, cols]` flattened to `[prod(...)*rows, cols]`;
1-D as `[n, 1]`). That one shape covers renamed copies (one whole tensor),
fused versus per-expert experts (2E per-expert matrices against the rows of
one fused tensor), and vocabularies of different sizes (the common rows).

Reading rows `[a, b)` of a view costs one `pread` per segment it crosses; a
worker's memory is the rows it asked for, never the tensor or the file. FP8
segments carry their block-scale tensor and are dequantized per chunk.
Rows inside one segment can also be seen in place, through a read-only
memory map of the file (`Reader.map_rows`): no copy, which is what lets the
fit run at a good fraction of a page-cache read.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lineage.dtypes import DTYPES, FP8
from lineage.errors import LineageError
from lineage.files import Stamp, open_fd
from lineage.header import TensorEntry
from lineage.layout import FP8_BLOCK

if TYPE_CHECKING:  # decoding imports torch when it runs; the BF16 kernel path never does
    import torch

HUGE = 2 << 20  # bytes of the largest page the kernel maps a file with (x86-64, arm64 4K)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a tensor seen as a matrix."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    return math.prod(shape[:-1]), shape[-1]


@dataclass(frozen=True)
class Scale:
    """An FP8 block-scale tensor: one F32/BF16 factor per 128x128 block."""

    path: str
    name: str
    dtype: str
    start: int
    rows: int  # rows of the scale seen as a matrix
    cols: int
    stamp: Stamp | None = None


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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
    """The scale must have one entry per 128x128 block of every 2-D slice."""
    r, c = matrix_shape(entry.shape)
    inner = entry.shape[-2] if len(entry.shape) >= 2 else r
    lead = r // inner if inner else 0
    want_r, want_c = lead * math.ceil(inner / FP8_BLOCK), math.ceil(c / FP8_BLOCK)
    got = matrix_shape(scale.shape)
    if got != (want_r, want_c) or scale.dtype not in ("F32", "BF16", "F16"):
        raise LineageError(
            f"{scale.path} [{scale.name}]: block scale {scale.dtype} {list(scale.shape)} does not fit "
            f"{entry.name} {list(entry.shape)} (expected float [{want_r}, {want_c}] for 128x128 blocks)"
        )


class Reader:
    """Byte-range reads with a small set of open files; use as a context manager.

    Network filesystems and object-store mounts fail transiently (a dropped
    connection, a file briefly missing while a sync replaces it), so a failed
    open or read is retried `retries` times with growing pauses, reopening
    the file, before it becomes an error row. A file that ends early is not
    retried: it is truncated, and waiting will not fix it.
    """

    def __init__(self, max_open: int = 64, retries: int = 3, backoff_s: float = 0.2) -> None:
        self._fds: dict[str, int] = {}
        self._max_open = max_open
        self.retries = retries
        self.backoff_s = backoff_s
        self.bytes_read = 0
        self.retried = 0
        self._pool: ThreadPoolExecutor | None = None
        self._scratch: dict[tuple[int, int], bytearray] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.RLock()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._close_files()
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a caller still holds rows; unmapped when they are freed
                pass
        self._maps.clear()

    def _close_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, path: str, name: str, stamp: Stamp | None) -> int:
        """The open descriptor of `path`, opened (without blocking, regular files
        only) on first use and compared with the file as planned: a file
        replaced or rewritten since would put other bytes at the planned
        offsets, so it is refused rather than read."""
        with self._lock:  # the fit's threads share the open files
            fd = self._fds.get(path)
            if fd is None:
                if len(self._fds) >= self._max_open:
                    self._close_files()
                fd, st = open_fd(path, "safetensors file")
                if stamp is not None and (st.st_size, st.st_mtime_ns) != (stamp.size, stamp.mtime_ns):
                    os.close(fd)
                    change = f"size {stamp.size} -> {st.st_size}" if st.st_size != stamp.size else "rewritten"
                    raise LineageError(
                        f"{path} [{name}]: file changed since the audit was planned ({change}); rerun to plan it again"
                    )
                self._fds[path] = fd
            return fd

    def pread(self, path: str, name: str, offset: int, nbytes: int, stamp: Stamp | None = None) -> bytearray:
        buf = bytearray(nbytes)
        self.pread_into(path, name, offset, memoryview(buf), stamp)
        return buf

    def pread_into(self, path: str, name: str, offset: int, view: memoryview, stamp: Stamp | None = None) -> None:
        for attempt in range(self.retries + 1):
            try:
                return self._pread(path, name, offset, view, stamp)
            except OSError as e:
                fd = self._fds.pop(path, None)
                if fd is not None:
                    os.close(fd)
                if attempt == self.retries:
                    raise LineageError(f"{path} [{name}]: read failed after {attempt + 1} attempts: {e.strerror or e}") from None
                self.retried += 1
                time.sleep(self.backoff_s * 4**attempt)
        raise AssertionError("unreachable")

    def _pread(self, path: str, name: str, offset: int, view: memoryview, stamp: Stamp | None) -> None:
        nbytes = len(view)
        fd = self._fd(path, name, stamp)
        got = 0
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise LineageError(f"{path} [{name}]: file ends before byte {offset + nbytes}; truncated?")
            got += n
        with self._lock:
            self.bytes_read += nbytes

    def prefetcher(self) -> ThreadPoolExecutor:
        """One background thread that reads ahead while the caller computes."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lineage-read")
        return self._pool

    def map_rows(self, view: View, a: int, b: int) -> memoryview | None:
        """Rows [a, b) of `view` as the stored bytes, in place in a read-only
        map of the file; None when they cross segments (read_raw copies them).
        Call `unmap_rows` with the same arguments when done.

        The file's size is checked when it is mapped, so a file truncated
        since planning is an error here, as with pread. (One truncated while
        it is being read would end the worker with SIGBUS; Ray then retries
        the unit, and the retry sees the short file.)
        """
        loc = self._locate(view, a, b)
        if loc is None:
            return None
        seg, off, n = loc
        mm = self._map(seg, off + n)
        with self._lock:
            self.bytes_read += n
        return memoryview(mm)[off : off + n]

    def unmap_rows(self, view: View, a: int, b: int, last: bool = True) -> None:
        """Drop the pages of mapped rows from this process (they stay in the
        page cache): without it every byte the fit touched would count in the
        worker's resident memory, which would then grow with the model.

        Whole 2 MiB blocks: the page cache maps large folios whole, and a
        partly dropped one stays resident. With `last=False` (more rows of
        this tensor follow) the block the rows end in is kept for the next
        call, so nothing is dropped that is about to be used."""
        loc = self._locate(view, a, b)
        if loc is None:
            return
        seg, off, n = loc
        mm = self._maps.get(seg.path)
        lo = off // HUGE * HUGE
        end = -(-(off + n) // HUGE) * HUGE if last else (off + n) // HUGE * HUGE
        hi = min(end, len(mm) if mm is not None else 0)
        if mm is not None and hasattr(mm, "madvise") and hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    @staticmethod
    def _locate(view: View, a: int, b: int) -> tuple[Segment, int, int] | None:
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

    def _map(self, seg: Segment, end: int) -> mmap.mmap:
        with self._lock:
            mm = self._maps.get(seg.path)
            if mm is None:  # the whole file, as long as it is now
                mm = self._maps[seg.path] = mmap.mmap(self._fd(seg.path, seg.name, seg.stamp), 0, access=mmap.ACCESS_READ)
            if len(mm) < end:
                raise LineageError(f"{seg.path} [{seg.name}]: file ends before byte {end}; truncated?")
            return mm

    def scratch(self, slot: int, nbytes: int) -> memoryview:
        """A reusable buffer of `nbytes` for `slot` of the calling thread (grown, never shrunk).

        Fresh multi-MB buffers cost a page fault per 4 KiB and a zero fill,
        which made reading, not the fit, the bottleneck; the streaming fit
        cycles through a few slots per thread instead."""
        key = (threading.get_ident(), slot)
        buf = self._scratch.get(key)
        if buf is None or len(buf) < nbytes:
            buf = self._scratch[key] = bytearray(nbytes)
        return memoryview(buf)[:nbytes]

    def read_raw(self, view: View, a: int, b: int, out: memoryview | bytearray | None = None) -> memoryview | bytearray:
        """Rows [a, b) of `view` as the stored bytes, undecoded, in one buffer
        (`out`, of exactly that size, when given)."""
        itemsize = DTYPES[view.segments[0].dtype].itemsize
        row_bytes = view.cols * itemsize
        if out is None:
            out = bytearray((b - a) * row_bytes)
        elif len(out) != (b - a) * row_bytes:
            raise ValueError(f"read_raw: buffer of {len(out)} bytes for {(b - a) * row_bytes}")
        pos, base = 0, 0
        for seg in view.segments:
            lo, hi = max(a, base), min(b, base + seg.rows)
            if lo < hi:
                n = (hi - lo) * row_bytes
                self.pread_into(
                    seg.path, seg.name, seg.start + (seg.row0 + lo - base) * row_bytes, memoryview(out)[pos : pos + n], seg.stamp
                )
                pos += n
            base += seg.rows
            if base >= b:
                break
        return out

    def read(self, view: View, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of `view` as a float32 (float64 for F64) [b - a, cols] tensor."""
        import torch

        parts = []
        base = 0
        for seg in view.segments:
            lo, hi = max(a, base), min(b, base + seg.rows)
            if lo < hi:
                parts.append(self.read_segment(seg, seg.row0 + lo - base, seg.row0 + hi - base))
            base += seg.rows
            if base >= b:
                break
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read_segment(self, seg: Segment, r0: int, r1: int) -> torch.Tensor:
        """Absolute rows [r0, r1) of the tensor behind `seg`, decoded."""
        import torch

        dt = DTYPES[seg.dtype]
        if dt.torch_dtype is None or not dt.is_float:
            raise LineageError(f"{seg.path} [{seg.name}]: {seg.dtype} is not a float dtype")
        row_bytes = seg.cols * dt.itemsize
        raw = self.pread(seg.path, seg.name, seg.start + r0 * row_bytes, (r1 - r0) * row_bytes, seg.stamp)
        x = torch.frombuffer(raw, dtype=dt.torch_dtype).reshape(r1 - r0, seg.cols)
        x = x.to(torch.float64 if seg.dtype == "F64" else torch.float32)
        if seg.dtype in FP8 and seg.scale is not None:
            x = x * self._scales(seg, r0, r1)
        return x

    def _scales(self, seg: Segment, r0: int, r1: int) -> torch.Tensor:
        """Per-element scale factors for rows [r0, r1): blocks expanded and cropped."""
        import torch

        sc = seg.scale
        assert sc is not None
        rows = torch.arange(r0, r1)
        blocks_per_slice = math.ceil(seg.inner_rows / FP8_BLOCK)
        block_row = (rows // seg.inner_rows) * blocks_per_slice + (rows % seg.inner_rows) // FP8_BLOCK
        b0, b1 = int(block_row[0]), int(block_row[-1]) + 1
        sdt = DTYPES[sc.dtype]
        raw = self.pread(sc.path, sc.name, sc.start + b0 * sc.cols * sdt.itemsize, (b1 - b0) * sc.cols * sdt.itemsize, sc.stamp)
        s = torch.frombuffer(raw, dtype=sdt.torch_dtype).reshape(b1 - b0, sc.cols).to(torch.float32)
        s = s[block_row - b0]  # one scale row per data row
        return s.repeat_interleave(FP8_BLOCK, dim=1)[:, : seg.cols]
