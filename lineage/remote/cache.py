"""A worker's own cache of the byte ranges it fetched (the `hub.cache_dir` setting).

Off by default: most audits read each byte once. With it, a rerun or a
resume on the same node fetches nothing twice. Each remote file (named by
its URL, which holds the commit, and its ETag) has a sparse data file the
size of the remote one, and a log of the ranges present. Data is written
first (pwrite at its own offset, fsynced), then one line `offset length`
is appended to the log (O_APPEND: atomic for lines this short), so a range
is in the log only when its bytes are on disk, whoever wrote it: several
workers on one node can share the folder.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from lineage.files import open_regular


class FetchCache:
    def __init__(self, root: str, url: str, size: int, etag: str | None) -> None:
        key = hashlib.sha256(f"{url}|{size}|{etag}".encode()).hexdigest()[:32]
        folder = Path(root).expanduser() / key[:2]
        folder.mkdir(parents=True, exist_ok=True)
        self.data = folder / f"{key}.bin"
        self.log = folder / f"{key}.ranges"
        self.size = size
        self._lock = threading.Lock()
        self._ranges: list[tuple[int, int]] = []
        self._log_size = -1

    def _load(self) -> None:
        """The ranges present, re-read when another worker appended to the log."""
        try:
            st = os.stat(self.log)
        except FileNotFoundError:
            return
        if st.st_size == self._log_size:
            return
        fd, _ = open_regular(self.log, "fetch cache log")
        try:
            text = os.pread(fd, st.st_size, 0).decode("ascii", "replace")
        finally:
            os.close(fd)
        ranges = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                a, n = int(parts[0]), int(parts[1])
                if 0 <= a and a + n <= self.size:
                    ranges.append((a, a + n))
        self._ranges = _merge(ranges)
        self._log_size = st.st_size

    def read(self, offset: int, out: memoryview) -> bool:
        """Fill `out` from the cache when [offset, offset + len(out)) is all there."""
        end = offset + len(out)
        with self._lock:
            self._load()
            if not any(a <= offset and end <= b for a, b in self._ranges):
                return False
        fd, _ = open_regular(self.data, "fetch cache")
        try:
            got = os.preadv(fd, [out], offset)
        finally:
            os.close(fd)
        return got == len(out)

    def write(self, offset: int, data: memoryview) -> None:
        with self._lock:
            fd = os.open(self.data, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                if os.fstat(fd).st_size < self.size:
                    os.ftruncate(fd, self.size)  # sparse: only written ranges take space
                os.pwritev(fd, [data], offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            line = f"{offset} {len(data)}\n".encode()
            fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
