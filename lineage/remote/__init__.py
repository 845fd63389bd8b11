"""Byte ranges of files that are not on this machine.

A remote file is named by its URL (a Hugging Face `resolve` URL at a commit
hash, so the bytes behind it never change). What reads it is one small
interface, `RangeFile`: `fetch(offset, out)` fills `out` with exactly the
bytes at `offset` or raises. `http.HttpRangeFile` implements it for HTTP(S)
(the hub and anything that serves ranges), `objectstore.ObjectRangeFile` for
object stores (`s3://`, `gs://`, through pyarrow's filesystems); another
store is one more implementation registered in `open_remote`.

Who fetches what: the driver fetches only headers, indexes and config.json
(remote/hub.py); each worker fetches the byte ranges of its own units
(reader.Reader sends remote reads here), coalescing neighbouring small
ranges, with bounded concurrency and retries, and never holds more than a
few spans of a file at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

#: Object stores (remote/objectstore.py).
OBJECT_SCHEMES = ("s3://", "gs://")
REMOTE_SCHEMES = ("http://", "https://", *OBJECT_SCHEMES)
#: Largest single request; bigger reads are split and fetched `concurrency` at a time.
PIECE = 4 << 20
#: Longest wait between two attempts of one request.
MAX_BACKOFF_S = 8.0

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if n not in _pools:
            _pools[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lineage-fetch")
        return _pools[n]


def fetch_pieces(get: Callable[[int, memoryview], None], offset: int, out: memoryview, concurrency: int) -> None:
    """Fill `out` with the bytes at `offset` by `get(offset, view)` requests of at most PIECE
    bytes, `concurrency` of them in flight at once (one process-wide pool per concurrency)."""
    n = len(out)
    pieces = [(a, min(n, a + PIECE)) for a in range(0, n, PIECE)]
    if len(pieces) == 1 or concurrency <= 1:
        for a, b in pieces:
            get(offset + a, out[a:b])
        return
    futs = [_pool(concurrency).submit(get, offset + a, out[a:b]) for a, b in pieces]
    for fut in futs:
        fut.result()


@dataclass(frozen=True)
class RemoteOptions:
    """How a worker fetches remote bytes (the `hub.*` settings)."""

    #: Range requests in flight at once per worker (a large read is split into pieces).
    concurrency: int = 4
    #: Attempts per request after the first, with backoff, on 429, 5xx, dropped
    #: connections and short bodies.
    retries: int = 6
    #: Seconds before the first retry; doubled each time, at most 8 s.
    backoff_s: float = 0.25
    #: A folder where workers keep the byte ranges they fetched (None: off), so a
    #: rerun or a resume fetches nothing twice.
    cache_dir: str | None = None


class RangeFile(Protocol):
    url: str

    def fetch(self, offset: int, out: memoryview) -> None:
        """Fill `out` with the file's bytes [offset, offset + len(out)), or raise LineageError."""
        ...


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def open_remote(url: str, size: int, etag: str | None, opts: RemoteOptions, mtime_ns: int = 0) -> RangeFile:
    """The RangeFile for `url` (an expected size and ETag, checked on every response; for an
    object store, the size and modification time, checked when it is first read)."""
    from lineage.remote.http import HttpRangeFile

    if url.startswith(("http://", "https://")):
        return HttpRangeFile(url, size, etag, opts)
    if url.startswith(OBJECT_SCHEMES):
        from lineage.remote.objectstore import ObjectRangeFile

        return ObjectRangeFile(url, size, mtime_ns or None, opts)
    raise ValueError(f"{url}: no reader for this scheme (known: {', '.join(REMOTE_SCHEMES)})")


def ranged_header(rf: RangeFile, size: int, stamp):
    """A shard's safetensors header by two range reads of `rf`: the 8-byte length first, checked
    against the 100 MB cap and the file's size before the header itself is read, then the
    header, parsed and checked as a local one is (header.py). Hub and object store alike."""
    from lineage.header import MAX_HEADER_BYTES, header_length, parse_header_bytes

    head = bytearray(min(8, size))
    rf.fetch(0, memoryview(head))
    n = header_length(bytes(head), rf.url, size, MAX_HEADER_BYTES)
    raw = bytearray(n)
    rf.fetch(8, memoryview(raw))
    return parse_header_bytes(bytes(raw), rf.url, size, stamp)
