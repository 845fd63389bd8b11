"""`s3://BUCKET/PREFIX` and `gs://BUCKET/PREFIX`: a model folder in an object store, read by byte ranges.

Object stores are the second `RangeFile` (remote/__init__.py), beside the
hub's HTTP one, through pyarrow's filesystems:

- `s3://`: S3 or an S3-compatible store, pyarrow's S3 filesystem (the AWS
  SDK: its credential chain, from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
  a profile or an instance role). An endpoint other than AWS's (MinIO, Ceph,
  R2, a test server) is given as AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL,
  the region as AWS_REGION or AWS_DEFAULT_REGION.
- `gs://`: Google Cloud Storage, pyarrow's GCS filesystem (google-cloud-cpp:
  Google's default credentials, from GOOGLE_APPLICATION_CREDENTIALS, gcloud's
  login or a GCE/GKE node's service account). STORAGE_EMULATOR_HOST (the
  variable Google's own clients read) points it at an emulator, without
  credentials. The SDK's own retries are capped at SDK_RETRY_S, so a dead
  endpoint fails in seconds and lineage's retries (`hub.retries`) apply.

As for the hub, the driver lists the prefix's objects (sizes and
modification times), reads the index whole under its cap and every shard's
header by two range reads (the 8-byte length, checked against the 100 MB
cap and the object's size, then the header), and no tensor byte passes
through it; each worker reads its own units' ranges. An object has no
commit: each one's size and modification time are its stamp, recorded in
`audit.json`; a worker refuses an object whose size or time changed since
planning, and a resume refuses an output_dir whose objects changed.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from functools import cache

from lineage.errors import LineageError
from lineage.files import MAX_INDEX_BYTES, Stamp
from lineage.header import Header
from lineage.remote import MAX_BACKOFF_S, OBJECT_SCHEMES, RemoteOptions, fetch_pieces, ranged_header

#: Seconds google-cloud-cpp may spend retrying one call before lineage's own retry takes over
#: (its default is 15 minutes, which is a hang to whoever waits).
SDK_RETRY_S = 20.0


@cache
def filesystem(scheme: str = "s3://"):
    """pyarrow's filesystem for `scheme` in this process (one connection pool per worker)."""
    from pyarrow import fs

    if scheme == "gs://":
        return _gcs()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    kw: dict = {"connect_timeout": 10.0, "request_timeout": 60.0}
    if endpoint:
        kw["endpoint_override"] = endpoint
    if region:
        kw["region"] = region
    return fs.S3FileSystem(**kw)


def _gcs():
    from datetime import timedelta
    from urllib.parse import urlparse

    from pyarrow import fs

    kw: dict = {"retry_time_limit": timedelta(seconds=SDK_RETRY_S)}
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        u = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        kw |= {"endpoint_override": u.netloc, "scheme": u.scheme or "http", "anonymous": True}
    if os.environ.get("GOOGLE_CLOUD_PROJECT"):
        kw["project_id"] = os.environ["GOOGLE_CLOUD_PROJECT"]
    return fs.GcsFileSystem(**kw)


def scheme_of(url: str) -> str:
    """The object-store scheme `url` starts with ("" when none)."""
    return next((s for s in OBJECT_SCHEMES if url.startswith(s)), "")


def split(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://BUCKET/KEY` or `gs://BUCKET/KEY`, refusing what is not one."""
    scheme = scheme_of(url)
    rest = url[len(scheme) :] if scheme else ""
    bucket, _, key = rest.partition("/")
    if not bucket or any(c in rest for c in "\n\r\x00"):
        raise LineageError(f"{url!r}: expected {scheme or 's3:// or gs://'}BUCKET/PREFIX")
    return bucket, key.strip("/")


def _path(url: str) -> str:
    bucket, key = split(url)
    return f"{bucket}/{key}" if key else bucket


class ObjectRangeFile:
    """One object: exact byte ranges, retried, its size and modification time checked once."""

    def __init__(self, url: str, size: int, stamp_ns: int | None, opts: RemoteOptions) -> None:
        self.url = url
        self.size = size
        self.stamp_ns = stamp_ns
        self.opts = opts
        self.fetched = 0
        self.retried = 0
        self._lock = threading.Lock()
        self._file = None

    def _open(self):
        with self._lock:
            if self._file is None:
                from pyarrow import fs

                info = self._retrying(lambda: filesystem(scheme_of(self.url)).get_file_info(_path(self.url)), "HEAD")
                if info.type != fs.FileType.File:
                    raise LineageError(f"{self.url}: no such object (it was there when the audit was planned)")
                if info.size != self.size or (self.stamp_ns and info.mtime_ns and info.mtime_ns != self.stamp_ns):
                    raise LineageError(
                        f"{self.url}: the object changed since the audit was planned ({info.size} bytes, planned "
                        f"{self.size}; or a new modification time); rerun to plan it again"
                    )
                self._file = self._retrying(lambda: filesystem(scheme_of(self.url)).open_input_file(_path(self.url)), "open")
            return self._file

    def _retrying(self, call, what: str):
        last = ""
        for attempt in range(self.opts.retries + 1):
            try:
                return call()
            except OSError as e:  # the SDK's network and server errors (its own retries exhausted)
                if "NoSuchKey" in str(e) or "NOT_FOUND" in str(e):
                    raise LineageError(f"{self.url}: no such object ({e})") from None
                last = str(e).splitlines()[0] if str(e) else type(e).__name__
                if attempt < self.opts.retries:
                    self.retried += 1
                    time.sleep(min(MAX_BACKOFF_S, self.opts.backoff_s * 2**attempt))
        raise LineageError(f"{self.url}: {what} failed after {self.opts.retries + 1} attempts ({last})")

    def fetch(self, offset: int, out: memoryview) -> None:
        n = len(out)
        if offset < 0 or offset + n > self.size:
            raise LineageError(f"{self.url}: bytes [{offset}, {offset + n}) lie outside the object's {self.size} bytes")
        if n == 0:
            return
        fetch_pieces(self._get, offset, out, self.opts.concurrency)

    def _read_at(self, n: int, offset: int):
        """One read; a handle that failed is dropped, so the next attempt opens (and checks) the
        object again (the GCS SDK closes a handle whose read failed)."""
        f = self._open()
        try:
            return f.read_at(n, offset)
        except (OSError, ValueError) as e:
            with self._lock:
                if self._file is f:
                    self._file = None
            if isinstance(e, ValueError):  # pyarrow: "I/O operation on closed file"
                raise OSError(str(e)) from None
            raise

    def _get(self, offset: int, out: memoryview) -> None:
        n = len(out)
        buf = self._retrying(lambda: self._read_at(n, offset), f"bytes {offset}-{offset + n - 1}")
        if len(buf) != n:
            raise LineageError(f"{self.url}: {len(buf)} bytes came back for bytes {offset}-{offset + n - 1}")
        out[:] = memoryview(buf)
        with self._lock:
            self.fetched += n


def _objects(source: str) -> dict[str, tuple[int, int]]:
    """{name: (size, mtime_ns)} of the objects directly under the prefix (or the one object named)."""
    from pyarrow import fs

    path = _path(source)
    store = filesystem(scheme_of(source))
    try:
        one = store.get_file_info(path)
        if one.type == fs.FileType.File:
            return {os.path.basename(path): (one.size, one.mtime_ns or 0)}
        infos = store.get_file_info(fs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LineageError(f"{source}: the object store cannot be listed ({first})") from None
    return {os.path.basename(i.path): (i.size, i.mtime_ns or 0) for i in infos if i.type == fs.FileType.File}


def resolve_object(name: str, source: str, opts: RemoteOptions | None = None):
    """The model at `s3://BUCKET/PREFIX` or `gs://BUCKET/PREFIX` (a folder of shards, or one .safetensors object), from
    its listing and headers only (see module docstring)."""
    from lineage.source import assemble, natural_key, parse_index, pick_shards

    opts = opts or RemoteOptions()
    objects = _objects(source)
    bucket, key = split(source)
    scheme = scheme_of(source)
    single = key.endswith(".safetensors") and len(objects) == 1
    root = f"{scheme}{bucket}/{key.rsplit('/', 1)[0] if single and '/' in key else ('' if single else key)}".rstrip("/")
    if not objects:
        raise LineageError(f"{source}: no objects under this prefix")
    names = sorted(objects, key=natural_key)
    warnings: list[str] = []

    def read_index(n: str) -> tuple[str, dict[str, str]]:
        url = f"{root}/{n}"
        return url, parse_index(read_object(url, MAX_INDEX_BYTES, objects[n], "index", opts), url, warnings)

    shards, weight_map = pick_shards(source, names, read_index, f"under {root}")
    headers: dict[str, tuple[str, Header]] = {}
    files = {}
    for shard in shards:
        size, mtime = objects[shard]
        url = f"{root}/{shard}"
        headers[url] = (shard, object_header(url, size, mtime, opts))
        files[shard] = {"size": size, "mtime_ns": mtime}
    m = assemble(name, source, root, headers, weight_map)
    m.warnings[:0] = warnings
    for extra in ("config.json", "tokenizer.json"):
        if extra in objects:
            files[extra] = {"size": objects[extra][0], "mtime_ns": objects[extra][1]}
    m.files = files
    m.commit = scheme[:-2] + hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:16]
    return m


def object_header(url: str, size: int, mtime_ns: int, opts: RemoteOptions) -> Header:
    """A shard's header by two range reads: the length (checked against the cap and the size
    before anything more is read), then the header."""
    return ranged_header(ObjectRangeFile(url, size, mtime_ns, opts), size, Stamp(size, mtime_ns, None))


def read_object(url: str, cap: int, stat: tuple[int, int] | None, what: str, opts: RemoteOptions | None = None) -> bytes:
    """A small object whole (an index, a config.json), refused above `cap` before it is read."""
    if stat is None:
        raise LineageError(f"{url}: {what} of unknown size")
    size, mtime = stat
    if size > cap:
        raise LineageError(f"{url}: {what} of {size} bytes is above the cap of {cap} bytes")
    buf = bytearray(size)
    ObjectRangeFile(url, size, mtime, opts or RemoteOptions()).fetch(0, memoryview(buf))
    return bytes(buf)
