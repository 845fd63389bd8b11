"""Opening files that strangers named, without hanging and without surprises.

Everything lineage opens (weights, indexes, config.json, model-set lists,
its own part files) is named by someone else: a path in a model set, a
shard in an index, a file an upload put in a folder. A name can be a FIFO
(opening it for reading blocks until a writer appears: forever), a socket,
a device (`/dev/zero` never ends) or a directory. So every open here is
`O_NONBLOCK` (a FIFO then opens at once), then `fstat` on the descriptor
(not a second `stat` of the path, which a swap could race) decides: only
regular files are read, and small documents are read with a size cap.

`inside` checks a path, after following links, stays inside a tree: a model
folder whose shard is a link to `/etc/shadow` or to another user's files is
refused, while the Hugging Face cache's links from `snapshots/` to `blobs/`
(inside the repository's cache folder) are allowed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from lineage.errors import LineageError

#: Caps on documents read whole. An index of Kimi K2 (139,644 tensors) is
#: about 10 MB; config.json files are a few KB; a list of uploads for a bulk
#: audit holds a few hundred rows.
MAX_INDEX_BYTES = 64 << 20
MAX_CONFIG_BYTES = 1 << 20
MAX_LIST_BYTES = 64 << 20

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
)


@dataclass(frozen=True, slots=True)
class Stamp:
    """What a file looked like when it was planned: its size and modification time.

    A worker compares the file it opens with the stamp and refuses one that
    changed (replaced by a longer file, rewritten in place), since the
    planned offsets would then point at other bytes. A remote file is
    stamped with its size and ETag instead (remote/http.py checks them)."""

    size: int
    mtime_ns: int = 0
    #: For a remote file: its ETag (the LFS sha256 on the hub), checked on every response.
    etag: str | None = None


def kind(mode: int) -> str:
    """A file type in words ('a FIFO (named pipe)', ...)."""
    return next((label for test, label in _KINDS if test(mode)), "not a regular file")


def open_fd(path: str | os.PathLike, what: str = "file") -> tuple[int, os.stat_result]:
    """A read-only descriptor of `path` and its stat, refused (LineageError) unless a regular file.

    Never blocks: FIFOs open at once with O_NONBLOCK and are then refused.
    O_NONBLOCK has no effect on reads of regular files, so it is kept. A
    failing open raises OSError, which a caller may retry (a network mount
    that dropped); a file of the wrong kind is final."""
    p = os.fspath(path)
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LineageError(f"{p}: {what} is {kind(st.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_regular(path: str | os.PathLike, what: str = "file") -> tuple[int, os.stat_result]:
    """`open_fd` with every failure as a one-line LineageError."""
    try:
        return open_fd(path, what)
    except OSError as e:
        raise LineageError(f"{os.fspath(path)}: cannot open {what}: {e.strerror or e}") from None


def read_small(path: str | os.PathLike, cap: int, what: str = "file") -> bytes:
    """The whole of a small regular file, refused above `cap` bytes (checked before reading)."""
    fd, st = open_regular(path, what)
    try:
        if st.st_size > cap:
            raise LineageError(f"{os.fspath(path)}: {what} of {st.st_size} bytes is above the cap of {cap} bytes")
        chunks, got = [], 0
        while True:  # a file that grows while it is read stops at the cap
            b = os.read(fd, min(1 << 20, cap + 1 - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
            if got > cap:
                raise LineageError(f"{os.fspath(path)}: {what} grew above the cap of {cap} bytes while read")
        return b"".join(chunks)
    except OSError as e:
        raise LineageError(f"{os.fspath(path)}: cannot read {what}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def inside(path: str | os.PathLike, tree: str | os.PathLike) -> bool:
    """`path`, links followed, lies inside `tree` (links followed too)."""
    real, root = os.path.realpath(path), os.path.realpath(tree)
    return os.path.commonpath([real, root]) == root


def check_regular(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """Stat of `path` (links followed) when it is a regular file; LineageError otherwise.

    For listings (is this shard a file?) where nothing is read yet: a stat,
    which never blocks, not an open."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise LineageError(f"{p}: {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LineageError(f"{p}: {what} is {kind(st.st_mode)}, not a regular file")
    return st
