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


def candidate_union(groups: list[Group], base: str | None) -> tuple[list[str], list, list[list[int]], list[list[str]]]:
    """(names, views) of every candidate any of `groups` pairs with, each group's indices
    into them in its column order, and those orders."""
    orders = [column_order(g, base) for g in groups]
    union: list[str] = list(dict.fromkeys(n for o in orders for n in o))
    views = {s.candidate: s.view for g in groups for s in g.paired}
    return union, [views[n] for n in union], [[union.index(n) for n in o] for o in orders], orders


def accumulate_shared(
    groups: list[Group],
    reader: Reader,
    opts: FitOptions,
    rows: tuple[int, int] | None = None,
    engine: str = "auto",
    keep: list | None = None,
) -> list[Stats]:
    """Stats of several suspects' groups of one tensor, each against its own paired
    candidates, reading each candidate row once (the union of the candidates is read,
    each suspect fitted against its own). Each Stats equals, bit for bit, what
    `accumulate` gives for that group alone, `bytes_read` included (what its own audit
    reads). `keep`: filled with the first candidate's and each suspect's leading rows,
    the sample the suspects are compared with each other on (relations.py)."""
    from lineage.engines import kernel

    g0 = groups[0]
    assert g0.view is not None
    if len(groups) == 1 and keep is None:
        return [accumulate(g0, reader, opts, rows, engine)]
    a, b = rows if rows is not None else (0, g0.view.rows)
    ranges = sample_ranges(a, b, block_rows(g0.view.cols), opts.sample_fraction, g0.tensor)
    union, cands, subsets, orders = candidate_union(groups, opts.base)
    suspects = [g.view for g in groups]
    use_kernel = engine == "kernel" or (engine == "auto" and opts.device == "cpu")
    use_kernel = use_kernel and all(kernel.applies([s, *(cands[j] for j in sub)]) for s, sub in zip(suspects, subsets))
    if use_kernel:
        out, read = kernel.accumulate_shared(
            suspects, cands, subsets, orders, reader, opts.chunk_bytes, ranges, opts.threads, keep=keep
        )
    else:
        from lineage.engines import torch_engine

        out, read = torch_engine.accumulate_shared(
            suspects, cands, subsets, orders, reader, opts.chunk_bytes, ranges, opts.device, keep=keep
        )
    n = len(suspects)
    for k, (st, sub) in enumerate(zip(out, subsets)):
        st.bytes_read = read[k] + sum(read[n + j] for j in sub)  # what its own audit reads
    return out


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
