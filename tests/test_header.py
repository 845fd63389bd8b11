"""The safetensors header parser against well-formed and hostile files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lineage.errors import LineageError
from lineage.header import parse_header_bytes, read_header
from tests.common import raw_safetensors


def test_reads_real_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}, str(p))
    h = read_header(p)
    assert set(h.tensors) == {"a", "b"}
    a = h.tensors["a"]
    assert (a.dtype, a.shape, a.nbytes) == ("F32", (3, 4), 48)
    assert a.start >= h.data_start and a.end <= h.file_size


def ok_header(**over):
    spec = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    spec.update(over)
    return {"w": spec}


@pytest.mark.parametrize(
    "header,data,message",
    [
        (ok_header(dtype="F33"), b"\0" * 16, "unknown dtype 'F33'"),
        (ok_header(data_offsets=[0, 32]), b"\0" * 16, "out of bounds"),
        (ok_header(data_offsets=[0, 12]), b"\0" * 16, "needs 16"),
        (ok_header(shape=[2, -1]), b"\0" * 16, "not a list of non-negative integers"),
        (ok_header(data_offsets="0-16"), b"\0" * 16, "not a pair of integers"),
        ({"w": 3}, b"", "entry is not an object"),
        ([1, 2], b"", "must be a JSON object"),
    ],
)
def test_hostile_entries(tmp_path, header, data, message):
    p = raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(LineageError) as e:
        read_header(p)
    assert str(p) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_tensor_listed_twice(tmp_path):
    raw = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    p = raw_safetensors(tmp_path / "d.safetensors", None, b"\0" * 8, header_bytes=raw)
    with pytest.raises(LineageError, match=r"d.safetensors \[w\]: tensor listed twice in the header"):
        read_header(p)


def test_overlapping_tensors(tmp_path):
    h = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    p = raw_safetensors(tmp_path / "o.safetensors", h, b"\0" * 24)
    with pytest.raises(LineageError, match=r"\[b\]: data overlaps tensor a"):
        read_header(p)


def test_truncated_and_lengths(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(LineageError, match="truncated file"):
        read_header(short)
    long = tmp_path / "long.safetensors"
    long.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(LineageError, match="runs past the end of the file"):
        read_header(long)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(LineageError, match="exceeds the cap"):
        read_header(huge)


def test_bad_json_and_utf8(tmp_path):
    p = raw_safetensors(tmp_path / "j.safetensors", None, header_bytes=b"{not json")
    with pytest.raises(LineageError, match="not valid JSON"):
        read_header(p)
    p = raw_safetensors(tmp_path / "u.safetensors", None, header_bytes=b'{"\xff": 1}')
    with pytest.raises(LineageError, match="not valid UTF-8"):
        read_header(p)


def test_truncated_data_section(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(64)}, str(p))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(LineageError, match=r"\[a\]: data_offsets \[0, 256\] out of bounds"):
        read_header(p)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
            lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
            max_leaves=20,
        ).map(lambda x: json.dumps(x).encode()),
        st.dictionaries(
            st.text(max_size=6),
            st.fixed_dictionaries(
                {
                    "dtype": st.sampled_from(["F32", "BF16", "F8_E4M3", "I64", "XX"]),
                    "shape": st.lists(st.integers(-2, 40), max_size=3),
                    "data_offsets": st.lists(st.integers(-5, 300), min_size=0, max_size=3),
                }
            ),
            max_size=4,
        ).map(lambda x: json.dumps(x).encode()),
    ),
    data_size=st.integers(0, 256),
)
def test_parser_property(raw, data_size):
    """Any header either parses into in-bounds, non-overlapping, size-consistent
    entries, or raises LineageError naming the file; nothing else escapes."""
    try:
        h = parse_header_bytes(raw, "f.safetensors", 8 + len(raw) + data_size)
    except LineageError as e:
        assert str(e).startswith("f.safetensors")
        return
    spans = sorted((t.start, t.end) for t in h.tensors.values() if t.end > t.start)
    for t in h.tensors.values():
        assert h.data_start <= t.start <= t.end <= h.file_size
        assert t.end - t.start == t.numel * {"F32": 4, "BF16": 2, "F8_E4M3": 1, "I64": 8}[t.dtype]
    for (_, e0), (s1, _) in zip(spans, spans[1:]):
        assert s1 >= e0
