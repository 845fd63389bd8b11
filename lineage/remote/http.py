"""Range requests over HTTP, through huggingface_hub's own session and headers.

The session is huggingface_hub's (`get_session()`: one client per process,
so per worker, with its connection pool, proxies from the environment and
redirects to the CDN followed); the headers are its `build_hf_headers()`
(the token from HF_TOKEN or the login cache, its user agent). Every request
asks for `bytes=a-b` and every answer is checked before a byte is kept:

- 429, 5xx, a dropped connection or a body shorter than announced is
  retried, with exponential backoff (a 429's Retry-After is honoured, up
  to the backoff cap);
- a 206 must carry `Content-Range: bytes a-b/SIZE` for exactly the range
  asked and the file size planned; a 200 (a server that ignores Range) is
  accepted only when the range is the whole file; more bytes than asked is
  an error;
- the ETag (or X-Linked-Etag) must be the one planned: the file at that
  commit cannot change on a real hub, so a different one means the server
  serves something else, and it is refused rather than mixed in.

A failure that retrying does not fix becomes a LineageError naming the URL,
which the worker turns into an `error` row for that tensor.
"""

from __future__ import annotations

import re
import threading
import time

from lineage.errors import LineageError
from lineage.remote import MAX_BACKOFF_S, RemoteOptions, fetch_pieces

#: Status codes worth retrying: rate limits and server-side trouble.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TIMEOUT_S = 60.0


def normalize_etag(value: str | None) -> str | None:
    if not value:
        return None
    return value.removeprefix("W/").strip('"')


class _Retry(Exception):
    def __init__(self, why: str, wait: float | None = None) -> None:
        super().__init__(why)
        self.wait = wait


class HttpRangeFile:
    """One remote file: exact byte ranges, verified, retried; optionally kept in a fetch cache."""

    def __init__(self, url: str, size: int, etag: str | None, opts: RemoteOptions) -> None:
        self.url = url
        self.size = size
        self.etag = etag
        self.opts = opts
        self.fetched = 0  # bytes that came over the network
        self.retried = 0
        self._lock = threading.Lock()
        self._cache = None
        if opts.cache_dir:
            from lineage.remote.cache import FetchCache

            self._cache = FetchCache(opts.cache_dir, url, size, etag)

    def fetch(self, offset: int, out: memoryview) -> None:
        n = len(out)
        if offset < 0 or offset + n > self.size:
            raise LineageError(f"{self.url}: bytes [{offset}, {offset + n}) lie outside the file's {self.size} bytes")
        if n == 0:
            return
        if self._cache is not None and self._cache.read(offset, out):
            return
        fetch_pieces(self._get, offset, out, self.opts.concurrency)
        if self._cache is not None:
            self._cache.write(offset, out)

    def _get(self, offset: int, out: memoryview) -> None:
        """One range request, retried until it gives exactly `len(out)` verified bytes."""
        last = ""
        for attempt in range(self.opts.retries + 1):
            try:
                self._request(offset, out)
                return
            except _Retry as e:
                last = str(e)
                if attempt == self.opts.retries:
                    break
                with self._lock:
                    self.retried += 1
                wait = min(MAX_BACKOFF_S, self.opts.backoff_s * 2**attempt)
                time.sleep(min(MAX_BACKOFF_S, e.wait) if e.wait is not None else wait)
        raise LineageError(
            f"{self.url}: bytes {offset}-{offset + len(out) - 1} failed after {self.opts.retries + 1} attempts ({last})"
        )

    def _request(self, offset: int, out: memoryview) -> None:
        import httpx2
        from huggingface_hub import get_session
        from huggingface_hub.utils import build_hf_headers

        n = len(out)
        end = offset + n - 1
        headers = build_hf_headers()
        headers.update({"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"})
        try:
            with get_session().stream("GET", self.url, headers=headers, timeout=TIMEOUT_S, follow_redirects=True) as r:
                if r.status_code in RETRY_STATUS:
                    raise _Retry(f"HTTP {r.status_code}", _retry_after(r.headers.get("Retry-After")))
                if r.status_code == 200:
                    if not (offset == 0 and n == self.size):
                        raise LineageError(f"{self.url}: the server ignored the byte range (HTTP 200 for bytes={offset}-{end})")
                elif r.status_code == 206:
                    self._check_range(r.headers.get("Content-Range"), offset, end)
                else:
                    raise LineageError(f"{self.url}: HTTP {r.status_code} for bytes={offset}-{end}")
                got_etag = normalize_etag(r.headers.get("X-Linked-Etag") or r.headers.get("ETag"))
                if self.etag and got_etag and got_etag != self.etag:
                    raise LineageError(
                        f"{self.url}: ETag {got_etag} is not the planned {self.etag}: the file changed on the hub since the audit was planned; rerun to plan it again"
                    )
                declared = r.headers.get("Content-Length")
                if declared is not None and int(declared) != n:
                    raise _Retry(f"Content-Length {declared} for a range of {n} bytes")
                got = 0
                for chunk in r.iter_bytes():
                    k = len(chunk)
                    if got + k > n:
                        raise LineageError(f"{self.url}: the server sent more than the {n} bytes asked for bytes={offset}-{end}")
                    out[got : got + k] = chunk
                    got += k
                if got != n:
                    raise _Retry(f"short body: {got} of {n} bytes")
        except (httpx2.TransportError, httpx2.DecodingError) as e:  # dropped connection, timeout, truncated body
            raise _Retry(f"{type(e).__name__}: {e}") from None
        with self._lock:
            self.fetched += n

    def _check_range(self, value: str | None, start: int, end: int) -> None:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (value or "").strip())
        if not m or (int(m.group(1)), int(m.group(2))) != (start, end):
            raise _Retry(f"Content-Range {value!r} for bytes={start}-{end}")
        if m.group(3) != "*" and int(m.group(3)) != self.size:
            raise LineageError(
                f"{self.url}: the file is {m.group(3)} bytes, the audit planned {self.size}; it changed since planning, rerun to plan it again"
            )


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def read_document(url: str, cap: int, size: int | None, what: str, opts: RemoteOptions | None = None) -> bytes:
    """A small remote file whole (an index, a config.json), refused above `cap` before it is fetched."""
    if size is None:
        raise LineageError(f"{url}: {what} of unknown size")
    if size > cap:
        raise LineageError(f"{url}: {what} of {size} bytes is above the cap of {cap} bytes")
    buf = bytearray(size)
    if size:
        HttpRangeFile(url, size, None, opts or RemoteOptions()).fetch(0, memoryview(buf))
    return bytes(buf)
