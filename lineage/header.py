"""Parse a safetensors header as hostile input, without touching tensor bytes.

A safetensors file is `u64 little-endian N`, then N bytes of UTF-8 JSON
mapping tensor names to `{dtype, shape, data_offsets}`, then the data. The
format is simple enough that the only danger is believing it: a length past
the end of the file, offsets outside the data, two tensors sharing bytes, or
a shape whose size disagrees with its byte range would make a reader return
garbage or read someone else's memory map. Everything is checked here so the
rest of lineage can trust a `TensorEntry`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from lineage.dtypes import DTYPES
from lineage.errors import LineageError
from lineage.files import Stamp, open_regular

#: Headers larger than this are refused (safetensors itself caps at 100 MB;
#: the largest real header, Kimi K2's biggest shard, is a few MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor's place in one file: absolute byte offsets, dtype, shape."""

    name: str
    path: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    stamp: Stamp | None = None  # the file as planned; None for manifests (nothing to read)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: str
    file_size: int
    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def header_length(head: bytes, path: str, file_size: int, max_header_bytes: int = MAX_HEADER_BYTES) -> int:
    """The header length N from a file's first 8 bytes, checked against the cap and the
    file size before a single header byte is read (or fetched, for a remote file)."""
    if len(head) < 8:
        raise LineageError(f"{path}: truncated file ({file_size} bytes), no safetensors header")
    (n,) = struct.unpack("<Q", head[:8])
    if n > max_header_bytes:
        raise LineageError(f"{path}: header length {n} exceeds the cap of {max_header_bytes} bytes")
    if 8 + n > file_size:
        raise LineageError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes); truncated?")
    return n


def read_header(path: str | os.PathLike, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of one safetensors file (a regular file: see files.py)."""
    raw, st = read_header_bytes(path, max_header_bytes)
    return parse_header_bytes(raw, str(path), st.st_size, Stamp(st.st_size, st.st_mtime_ns))


def read_header_bytes(path: str | os.PathLike, max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[bytes, os.stat_result]:
    """The header JSON bytes of a local file and the file's stat, the length checked first."""
    p = str(path)
    fd, st = open_regular(p, "safetensors file")
    try:
        n = header_length(os.pread(fd, 8, 0), p, st.st_size, max_header_bytes)
        raw = b""
        while len(raw) < n:
            b = os.pread(fd, n - len(raw), 8 + len(raw))
            if not b:
                raise LineageError(f"{p}: file ends inside its header; truncated?")
            raw += b
    except OSError as e:
        raise LineageError(f"{p}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return raw, st


def parse_header_bytes(raw: bytes, path: str, file_size: int, stamp: Stamp | None = None) -> Header:
    """Validate header JSON `raw` of a file of `file_size` bytes at `path`."""
    data_start = 8 + len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineageError(f"{path}: header is not valid UTF-8 (byte {e.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise LineageError(f"{path} [{e.args[0]}]: tensor listed twice in the header") from None
    except json.JSONDecodeError as e:
        raise LineageError(f"{path}: header is not valid JSON ({e.msg} at {e.pos})") from None
    except RecursionError:
        raise LineageError(f"{path}: header JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise LineageError(f"{path}: header must be a JSON object, got {type(doc).__name__}")
    data_size = file_size - data_start
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorEntry] = {}
    for name, spec in doc.items():
        if name == "__metadata__":
            if isinstance(spec, dict):
                metadata = {str(k): str(v) for k, v in spec.items()}
            continue
        tensors[name] = _entry(path, name, spec, data_start, data_size, stamp)
    _check_overlaps(path, tensors)
    return Header(path, file_size, data_start, tensors, metadata)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object that names a key twice is refused: `json` would keep the
    last silently, and a reader that keeps the first would see other bytes."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _entry(path: str, name: str, spec: object, data_start: int, data_size: int, stamp: Stamp | None) -> TensorEntry:
    def bad(problem: str) -> LineageError:
        return LineageError(f"{path} [{name}]: {problem}")

    if not isinstance(spec, dict):
        raise bad("entry is not an object")
    dtype = spec.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    offs = spec.get("data_offsets")
    if not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs):
        raise bad(f"data_offsets {offs!r} is not a pair of integers")
    begin, end = offs
    if not 0 <= begin <= end <= data_size:
        raise bad(f"data_offsets [{begin}, {end}] out of bounds of the {data_size}-byte data section")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise bad(f"data_offsets span {end - begin} bytes but {dtype} x {shape} needs {expected}")
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, data_start + end, stamp)


def _check_overlaps(path: str, tensors: dict[str, TensorEntry]) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise LineageError(f"{path} [{n1}]: data overlaps tensor {n0}")


def is_safetensors_name(path: Path) -> bool:
    return path.name.endswith(".safetensors")
