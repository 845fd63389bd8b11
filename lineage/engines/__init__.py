"""The streaming pass: one tensor comparison's bytes into Stats, by one of two engines.

`accumulate` reads the rows of every side of a group (all of them, a row
range of a split tensor, or the sampled blocks) and returns their Stats.
Two engines compute the same numbers: `kernel` (lineage/_kernel.c, one pass
over the raw bytes, CPU) and `torch_engine` (any device: the GPU actors, and
the fallback for float64 inputs, more candidates than the kernel takes, or
where the extension was not built). They differ only in the order of
float64 additions (relative differences around 1e-13).
"""

from __future__ import annotations

import numpy as np

from lineage.align import Group
from lineage.options import FitOptions
from lineage.reader import Reader
from lineage.sampling import block_rows, sample_ranges
from lineage.stats import Stats


def column_order(group: Group, base: str | None) -> list[str]:
    """Paired candidates, the declared base first when it is paired."""
    names = [s.candidate for s in group.paired]
    if base in names:
        names.remove(base)
        names.insert(0, base)
    return names


def accumulate_shared(
    groups: list[Group],
    reader: Reader,
    opts: FitOptions,
    rows: tuple[int, int] | None = None,
    engine: str = "auto",
    keep: list | None = None,
) -> list[Stats]:
    """Stats of several suspects' groups that pair with the same candidate views, reading
    each candidate row once. Each Stats equals, bit for bit, what `accumulate` gives for
    that group alone, `bytes_read` included (the candidates' bytes counted for each).
    `keep`: filled with the reference candidate's and each suspect's leading rows, the
    sample the suspects are compared with each other on (relations.py)."""
    from lineage.engines import kernel

    g0 = groups[0]
    assert g0.view is not None
    if len(groups) == 1:
        return [accumulate(g0, reader, opts, rows, engine)]
    a, b = rows if rows is not None else (0, g0.view.rows)
    ranges = sample_ranges(a, b, block_rows(g0.view.cols), opts.sample_fraction, g0.tensor)
    order = column_order(g0, opts.base)
    cands = [next(s.view for s in g0.paired if s.candidate == c) for c in order]
    suspects = [g.view for g in groups]
    use_kernel = engine == "kernel" or (engine == "auto" and opts.device == "cpu" and kernel.applies([suspects[0], *cands]))
    use_kernel = use_kernel and all(kernel.applies([s, *cands]) for s in suspects)
    before = reader.bytes_read
    if use_kernel:
        out = kernel.accumulate_shared(suspects, cands, order, reader, opts.chunk_bytes, ranges, opts.threads, keep=keep)
    else:
        from lineage.engines import torch_engine

        out = torch_engine.accumulate_shared(suspects, cands, order, reader, opts.chunk_bytes, ranges, opts.device, keep=keep)
    own = [sum(_bytes(v, r0, r1) for r0, r1 in ranges) for v in suspects]
    shared = reader.bytes_read - before - sum(own)
    for st, n in zip(out, own):
        st.bytes_read = shared + n
    return out


def _bytes(view, a: int, b: int) -> int:
    """Stored bytes of rows [a, b) of a view."""
    from lineage.dtypes import DTYPES
    from lineage.geometry import pieces

    return sum((r1 - r0) * seg.cols * DTYPES[seg.dtype].itemsize for seg, r0, r1 in pieces(view, a, b))


def accumulate(
    group: Group, reader: Reader, opts: FitOptions, rows: tuple[int, int] | None = None, engine: str = "auto"
) -> Stats:
    """Stream rows `rows` (default all) of every side of `group` into Stats.

    `engine`: "kernel" (CPU only), "torch", or "auto" (the kernel where it
    applies). On `device="cuda"` the torch float64 arithmetic runs on the
    GPU (float64 keeps TF32 out of the picture).
    """
    from lineage.engines import kernel

    assert group.view is not None
    a, b = rows if rows is not None else (0, group.view.rows)
    ranges = sample_ranges(a, b, block_rows(group.view.cols), opts.sample_fraction, group.tensor)
    order = column_order(group, opts.base)
    views = [group.view] + [next(s.view for s in group.paired if s.candidate == c) for c in order]
    use_kernel = engine == "kernel" or (engine == "auto" and opts.device == "cpu" and kernel.applies(views))
    before = reader.bytes_read
    if use_kernel:
        st = kernel.accumulate(views, order, reader, opts.chunk_bytes, ranges, opts.threads)
    else:
        from lineage.engines import torch_engine

        st = torch_engine.accumulate(views, order, reader, opts.chunk_bytes, ranges, opts.device)
    st.bytes_read = reader.bytes_read - before
    return st


def count_nonfinite(st: Stats, order: list[str], counts: list[int]) -> bool:
    """Record non-finite values per side (suspect first); True if the chunk has any."""
    for label, nf in zip(["suspect", *order], counts):
        if nf:
            st.nonfinite[label] = st.nonfinite.get(label, 0) + nf
    return any(counts)


def nonfinite_np(x: np.ndarray) -> int:
    """Non-finite values in float32 values or BF16 bits (exponent all ones)."""
    if x.dtype == np.uint16:
        return int(np.count_nonzero((x & 0x7F80) == 0x7F80))
    return int(x.size - np.count_nonzero(np.isfinite(x)))
