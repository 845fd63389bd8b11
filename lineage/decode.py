"""Stored bytes to numbers: what the torch engine and the FP8 path need.

F32, F16 and BF16 are decoded by torch (the C kernel reads BF16 bits
itself and never comes here). FP8 (E4M3 / E5M2) is stored with a block
scale: one F32/BF16 factor per FP8_BLOCK x FP8_BLOCK block of each 2-D
slice, possibly in another shard, named `<weight>_scale_inv`; the value is
`fp8.float() * scale`, the block's factor expanded to its rows and columns
and cropped at the edges (192 columns are one full block and one of 64).
Rows are decoded per chunk, so memory stays bounded by the chunk.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from lineage.dtypes import DTYPES, FP8
from lineage.errors import LineageError
from lineage.geometry import Segment, View, pieces
from lineage.layout import FP8_BLOCK
from lineage.reader import Reader

if TYPE_CHECKING:  # imported when decoding runs; the BF16 kernel path never decodes
    import torch


#: Stored dtypes numpy turns into float32 exactly, without torch (BF16 by its bits).
NUMPY_FLOAT32 = frozenset({"F32", "F16", "BF16"})


def as_float32(reader: Reader, view: View, a: int, b: int) -> np.ndarray | None:
    """Rows [a, b) of `view` flattened to float32 with numpy, or None when a segment
    needs torch (FP8 with its scales, F64). F16 and BF16 are subsets of float32, so
    the values are the same torch would give; workers on this path never import torch."""
    if not all(seg.dtype in NUMPY_FLOAT32 for seg in view.segments):
        return None
    out = []
    for seg, r0, r1 in pieces(view, a, b):
        row_bytes = seg.cols * DTYPES[seg.dtype].itemsize
        raw = reader.pread(seg.path, seg.name, seg.start + r0 * row_bytes, (r1 - r0) * row_bytes, seg.stamp)
        if seg.dtype == "F32":
            out.append(np.frombuffer(raw, dtype="<f4"))
        elif seg.dtype == "F16":
            out.append(np.frombuffer(raw, dtype="<f2").astype(np.float32))
        else:
            out.append((np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32))
    return out[0] if len(out) == 1 else np.concatenate(out)


def decoded(reader: Reader, view: View, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of `view` as a float32 (float64 for F64) [b - a, cols] tensor."""
    import torch

    parts = [decode_segment(reader, seg, r0, r1) for seg, r0, r1 in pieces(view, a, b)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def decode_segment(reader: Reader, seg: Segment, r0: int, r1: int) -> torch.Tensor:
    """Absolute rows [r0, r1) of the tensor behind `seg`, decoded."""
    import torch

    dt = DTYPES[seg.dtype]
    if dt.torch_dtype is None or not dt.is_float:
        raise LineageError(f"{seg.path} [{seg.name}]: {seg.dtype} is not a float dtype")
    row_bytes = seg.cols * dt.itemsize
    raw = reader.pread(seg.path, seg.name, seg.start + r0 * row_bytes, (r1 - r0) * row_bytes, seg.stamp)
    x = torch.frombuffer(raw, dtype=dt.torch_dtype).reshape(r1 - r0, seg.cols)
    x = x.to(torch.float64 if seg.dtype == "F64" else torch.float32)
    if seg.dtype in FP8 and seg.scale is not None:
        x = x * block_scales(reader, seg, r0, r1)
    return x


def block_scales(reader: Reader, seg: Segment, r0: int, r1: int) -> torch.Tensor:
    """Per-element scale factors for rows [r0, r1): blocks expanded and cropped."""
    import torch

    sc = seg.scale
    assert sc is not None
    rows = torch.arange(r0, r1)
    blocks_per_slice = math.ceil(seg.inner_rows / FP8_BLOCK)
    block_row = (rows // seg.inner_rows) * blocks_per_slice + (rows % seg.inner_rows) // FP8_BLOCK
    b0, b1 = int(block_row[0]), int(block_row[-1]) + 1
    sdt = DTYPES[sc.dtype]
    raw = reader.pread(sc.path, sc.name, sc.start + b0 * sc.cols * sdt.itemsize, (b1 - b0) * sc.cols * sdt.itemsize, sc.stamp)
    s = torch.frombuffer(raw, dtype=sdt.torch_dtype).reshape(b1 - b0, sc.cols).to(torch.float32)
    s = s[block_row - b0]  # one scale row per data row
    return s.repeat_interleave(FP8_BLOCK, dim=1)[:, : seg.cols]
