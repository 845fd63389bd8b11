"""The output folder: checked before any work, and held by one audit at a time.

`prepare` refuses, before anything is planned or started, an `output_dir`
that is empty, lies under a kernel file system (`/proc`, `/sys`, `/dev`),
is a file, cannot be created or is not writable: each is one clear line,
where the alternative was a traceback after minutes of work.

`lock` holds an advisory lock (`fcntl.flock`) on `OUTPUT_DIR/.lock` for the
whole run. Two audits started at the same moment into the same folder would
both resume from the same state and write every tensor twice; with the lock
the second refuses at once, naming the holder (pid, host, start time), or
waits for it when asked to. The lock is released by the kernel when the
holder exits, however it exits, so a killed audit never leaves a stale one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lineage.errors import LineageError, printable

#: Kernel file systems: writing results there fails in odd ways, or worse.
FORBIDDEN = ("/proc", "/sys", "/dev")
LOCK = ".lock"


def prepare(output_dir: str | os.PathLike | None) -> Path:
    """The absolute output folder, created if needed; LineageError if it cannot hold results."""
    if output_dir is None or not str(output_dir).strip():
        raise LineageError("output_dir is empty; name a folder for the results (output_dir=DIR)")
    if not str(output_dir).isprintable():
        raise LineageError(f"output_dir {printable(output_dir)} has control characters")
    out = Path(os.path.expanduser(str(output_dir))).absolute()
    real = os.path.realpath(out)
    for top in FORBIDDEN:
        if real == top or real.startswith(top + os.sep):
            raise LineageError(f"output_dir {out}: lies under {top}, a kernel file system; choose a folder on a disk")
    if out.exists() and not out.is_dir():
        raise LineageError(f"output_dir {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LineageError(f"output_dir {out}: cannot be created ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise LineageError(f"output_dir {out}: is not writable by this user")
    return out


def holder(out_dir: Path) -> dict:
    """Who holds (or last held) the lock: pid, host, since; {} when unknown."""
    try:
        doc = json.loads((out_dir / LOCK).read_text() or "{}")
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def lock(out_dir: Path, wait: bool = False, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `out_dir`'s lock for the duration; refuse (or, with `wait`, wait) if another audit holds it."""
    path = Path(out_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise LineageError(f"output_dir {out_dir}: cannot create its lock file {LOCK} ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise LineageError(f"output_dir {out_dir}: cannot lock ({e.strerror or e})") from None
            h = holder(Path(out_dir))
            who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"
            if not wait:
                raise LineageError(
                    f"output_dir {out_dir}: another audit is writing there ({who}); wait for it to finish, "
                    "choose another output_dir, or set write.wait_for_lock=true to wait"
                ) from None
            if say is not None:
                say(f"waiting for the audit writing to {out_dir} ({who})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
