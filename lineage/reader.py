"""Byte-range reads of tensor files, by a worker, within a bounded memory.

Reading rows `[a, b)` of a view costs one `pread` per segment it crosses;
a worker's memory is the rows it asked for, never the tensor or the file.
Rows inside one segment can also be seen in place, through a read-only
memory map of the file (`Reader.map_rows`): no copy, which is what lets the
fit run at a good fraction of a page-cache read. Files are opened without
blocking, regular files only, and compared with the file as planned
(files.py); decoding the bytes into numbers is decode.py's.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from lineage.dtypes import DTYPES
from lineage.errors import LineageError
from lineage.files import Stamp, open_fd
from lineage.geometry import Segment, View, locate, pieces
from lineage.remote import RangeFile, RemoteOptions, is_remote, open_remote
from lineage.remote.coalesce import Coalescer

HUGE = 2 << 20  # bytes of the largest page the kernel maps a file with (x86-64, arm64 4K)


class Reader:
    """Byte-range reads with a small set of open files; use as a context manager.

    Network filesystems and object-store mounts fail transiently (a dropped
    connection, a file briefly missing while a sync replaces it), so a failed
    open or read is retried `retries` times with growing pauses, reopening
    the file, before it becomes an error row. A file that ends early is not
    retried: it is truncated, and waiting will not fix it.
    """

    def __init__(self, max_open: int = 64, retries: int = 3, backoff_s: float = 0.2, remote: RemoteOptions | None = None) -> None:
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
        self.remote = remote or RemoteOptions()
        self._remote: dict[str, RangeFile | str] = {}  # URL -> its fetcher, or this node's cached copy
        self._coalesce = Coalescer()

    @property
    def bytes_fetched(self) -> int:
        """Bytes that came over the network (coalesced gaps included)."""
        return sum(getattr(rf, "fetched", 0) for rf in self._remote.values() if not isinstance(rf, str))

    def expect(self, ranges: dict[str, list[tuple[int, int]]]) -> None:
        """The byte ranges of remote files this reader is about to read (coalesce.py)."""
        self._coalesce.plan(ranges)

    def local(self, path: str, stamp: Stamp | None) -> str | None:
        """Where `path` can be read on this machine: itself, or for a hub URL this node's
        Hugging Face cache copy at the same commit; None when it must be fetched."""
        if not is_remote(path):
            return path
        with self._lock:
            got = self._remote.get(path)
            if got is None:
                from lineage.remote.hub import cached_file, parse_url

                parts = parse_url(path)  # (repo_id, commit, filename)
                copy = cached_file(parts[0], parts[2], parts[1], stamp.size if stamp else None) if parts else None
                got = (
                    copy
                    if copy is not None
                    else open_remote(
                        path,
                        stamp.size if stamp else 0,
                        stamp.etag if stamp else None,
                        self.remote,
                        stamp.mtime_ns if stamp else 0,
                    )
                )
                self._remote[path] = got
            return got if isinstance(got, str) else None

    def mappable(self, view: View) -> bool:
        """Every segment of `view` is a file on this machine (so it can be memory-mapped)."""
        return all(self.local(seg.path, seg.stamp) is not None for seg in view.segments)

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
        local = self.local(path, stamp)
        if local is None:  # fetched: remote/http.py retries and verifies every response
            self._coalesce.read(self._remote[path], offset, view)  # type: ignore[arg-type]
            with self._lock:
                self.bytes_read += nbytes
            return
        if local != path:  # this node's cache copy of a hub file: same bytes, its own stat
            path, stamp = local, None
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
        loc = locate(view, a, b)
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
        loc = locate(view, a, b)
        if loc is None:
            return
        seg, off, n = loc
        mm = self._maps.get(seg.path)
        lo = off // HUGE * HUGE
        end = -(-(off + n) // HUGE) * HUGE if last else (off + n) // HUGE * HUGE
        hi = min(end, len(mm) if mm is not None else 0)
        if mm is not None and hasattr(mm, "madvise") and hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def _map(self, seg: Segment, end: int) -> mmap.mmap:
        with self._lock:
            mm = self._maps.get(seg.path)
            if mm is None:  # the whole file, as long as it is now
                local = self.local(seg.path, seg.stamp)
                assert local is not None, "map only what mappable() allows"
                fd = self._fd(local, seg.name, seg.stamp if local == seg.path else None)
                mm = self._maps[seg.path] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
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
        row_bytes = view.cols * DTYPES[view.segments[0].dtype].itemsize
        if out is None:
            out = bytearray((b - a) * row_bytes)
        elif len(out) != (b - a) * row_bytes:
            raise ValueError(f"read_raw: buffer of {len(out)} bytes for {(b - a) * row_bytes}")
        pos = 0
        for seg, r0, r1 in pieces(view, a, b):
            n = (r1 - r0) * row_bytes
            self.pread_into(seg.path, seg.name, seg.start + r0 * row_bytes, memoryview(out)[pos : pos + n], seg.stamp)
            pos += n
        return out
