"""Which rows a (sampled) read covers, and how they are cut into chunks.

The sampled mode (`fit.sample_fraction` < 1) reads a deterministic, evenly
spaced subset of row blocks of about SAMPLE_BLOCK_ELEMENTS elements each
(256 KiB of BF16: large enough that a byte-range read is efficient, small
enough that a tenth of a tensor is many blocks spread over it).
"""

from __future__ import annotations

import zlib

SAMPLE_BLOCK_ELEMENTS = 131072


def sample_ranges(a: int, b: int, block_rows: int, fraction: float, key: str) -> list[tuple[int, int]]:
    """Row ranges covering about `fraction` of rows [a, b), in evenly spaced blocks.

    Deterministic for a given tensor (`key` sets the phase, so neighbouring
    tensors are not all sampled at the same offsets); at least one block.
    """
    if fraction >= 1.0 or b <= a:
        return [(a, b)]
    nb = -(-(b - a) // block_rows)
    keep = max(1, min(nb, round(nb * fraction)))
    phase = (zlib.crc32(key.encode()) % 1000) / 1000
    picks = sorted({min(nb - 1, int((i + phase) * nb / keep)) for i in range(keep)})
    out: list[tuple[int, int]] = []
    for i in picks:
        r0, r1 = a + i * block_rows, min(b, a + (i + 1) * block_rows)
        if out and out[-1][1] == r0:
            out[-1] = (out[-1][0], r1)
        else:
            out.append((r0, r1))
    return out


def block_rows(cols: int) -> int:
    """Rows of one sample block of a matrix with `cols` columns."""
    return max(1, SAMPLE_BLOCK_ELEMENTS // cols)


def chunks(ranges: list[tuple[int, int]], step: int) -> list[tuple[int, int]]:
    """Each range cut into pieces of at most `step` rows."""
    return [(r0, min(b, r0 + step)) for a, b in ranges for r0 in range(a, b, step)]
