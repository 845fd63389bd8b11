"""The C kernel engine: the streaming pass over raw bytes, at close to read speed.

lineage/_kernel.c does one fused step per 8 elements (decode BF16 bits or
take float32, form the float64 differences, count exact and near-equal
elements, add to the Gram matrix, the row and column sums and the
dropped-delta energy). This module feeds it: BF16 rows that lie in one
tensor are fitted in place in the page cache through a read-only memory
map (no copy), dropped from the process after each chunk; other rows are
read into reused buffers (F16, F32 and FP8 decoded to float32 by torch
first). The kernel releases the GIL, so a worker given n CPUs runs n of
them over fixed row pieces, and the result does not depend on n.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache

import numpy as np

from lineage.decode import as_float32, decoded
from lineage.dtypes import view_tolerance
from lineage.engines import count_nonfinite, nonfinite_np
from lineage.reader import Reader
from lineage.sampling import chunks
from lineage.stats import Stats

try:  # the compiled inner loop; the torch engine computes the same numbers
    from lineage import _kernel
except ImportError:  # pragma: no cover - built without a C compiler
    _kernel = None


#: Bytes of raw input per read, all sides together. Each read goes to the
#: kernel as KERNEL_SPLIT row pieces of about 8 MiB: large enough that the
#: per-piece Python work (buffers, maps, the call) is noise, and the same
#: pieces whatever the thread count, so the order of float64 additions (and
#: the result) does not depend on how many threads ran them.
KERNEL_CHUNK = 16 << 20
KERNEL_SPLIT = 2
#: Chunks mapped ahead of the one being finished, so kernel threads never wait for each other.
AHEAD = 2


@cache
def _kernel_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lineage-fit")


def applies(views: list) -> bool:
    """The kernel takes float32-decodable inputs and at most its MAX_CANDIDATES candidates."""
    if _kernel is None or not 2 <= len(views) <= 1 + _kernel.MAX_CANDIDATES:
        return False
    return all(seg.dtype != "F64" for v in views for seg in v.segments)


def _raw_bf16(views: list) -> bool:
    return all(seg.dtype == "BF16" for v in views for seg in v.segments)


def accumulate(
    views: list, order: list[str], reader: Reader, chunk_bytes: int, ranges, threads: int = 1, mmap_ok: bool = True
) -> Stats:
    """The same statistics through lineage._kernel (which releases the GIL).

    Every read chunk is cut into KERNEL_SPLIT row pieces, and the pieces'
    statistics are added in piece order whatever ran them, so the result
    does not depend on `threads`. Raw BF16 rows that lie in one tensor are
    fitted in place in the files' pages (`Reader.map_rows`: no copy, no read
    thread; `threads` kernels at a time). Other rows are read into reused
    buffers: with one thread a second one reads the next chunk while the
    kernel runs; with several, each reads and fits whole pieces.
    `mmap_ok=False` forces the copying path (tests compare the two).
    """
    assert _kernel is not None
    k, cols = len(order), views[0].cols
    st = Stats(order, cols=cols)
    raw = _raw_bf16(views)
    itemsize = 2 if raw else 4
    step = max(1, min(chunk_bytes, KERNEL_CHUNK) // (cols * itemsize * (k + 1)))
    fn = _kernel.accumulate_bf16 if raw else _kernel.accumulate_f32
    tols = np.array([view_tolerance(views[0].dtype, v.dtype) for v in views[1:]], dtype=np.float64)
    work = chunks(ranges, step)

    def load(r0: int, r1: int, slot: int) -> list[np.ndarray]:
        if raw:  # into reused buffers: `slot` alternates so a read never lands in the buffer being fitted
            nb = (r1 - r0) * cols * 2
            bufs = [reader.scratch(2 * j + slot, nb) for j in range(len(views))]
            return [np.frombuffer(reader.read_raw(v, r0, r1, b), dtype=np.uint16) for v, b in zip(views, bufs)]
        return [
            x if (x := as_float32(reader, v, r0, r1)) is not None else decoded(reader, v, r0, r1).reshape(-1).numpy()
            for v in views
        ]

    def fit(xs: list[np.ndarray]) -> tuple | list[np.ndarray]:
        """Stats arrays and element count of one piece; its inputs instead if they hold non-finite values."""
        out = (np.zeros((k + 1, k + 1)), np.zeros(k + 1), np.zeros(2 * k, dtype=np.int64))
        rg, cs, dr = np.zeros((k + 1, k + 1)), np.zeros((k + 1, cols)), np.zeros(k)
        fn(*out, tols, xs[0], tuple(xs[1:]), cols, cs, rg, dr)
        if not (np.isfinite(out[0]).all() and np.isfinite(out[1]).all()):
            return [x.copy() for x in xs]
        return (*out, rg, cs, dr, xs[0].size)

    def fit_mapped() -> list:
        """Fit every chunk in place in the files' pages, keeping the kernel
        threads busy across chunk boundaries (up to AHEAD chunks mapped at
        once), and drop each chunk's pages from this process once its pieces
        are done."""
        out: list = []
        pending: deque = deque()

        def finish() -> None:
            r0, r1, mvs, futs, last = pending.popleft()
            out.extend(f.result() if isinstance(f, Future) else f for f in futs)
            for v, m in zip(views, mvs):
                try:
                    m.release()
                except BufferError:  # an exception's traceback still holds the arrays
                    pass
                reader.unmap_rows(v, r0, r1, last)

        try:
            for i, (r0, r1) in enumerate(work):
                last = i == len(work) - 1 or work[i + 1][0] != r1
                mvs = [reader.map_rows(v, r0, r1) for v in views]  # one segment per view: never None
                xs = [np.frombuffer(m, dtype=np.uint16) for m in mvs]  # type: ignore[arg-type]
                parts = [[x[(a - r0) * cols : (b - r0) * cols] for x in xs] for a, b in cut(r0, r1)]
                del xs
                if threads > 1:
                    futs = [_kernel_pool(threads).submit(fit, part) for part in parts]
                else:
                    futs = [fit(part) for part in parts]
                del parts
                pending.append((r0, r1, mvs, futs, last))
                while len(pending) > (AHEAD if threads > 1 else 0):
                    finish()
        finally:
            while pending:
                finish()
        return out

    def cut(r0: int, r1: int) -> list[tuple[int, int]]:
        cuts = [r0 + (r1 - r0) * j // KERNEL_SPLIT for j in range(KERNEL_SPLIT + 1)]
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]

    results: list = []
    mapped = raw and mmap_ok and all(len(v.segments) == 1 and reader.mappable(v) for v in views)
    if mapped:  # no copy and no read thread: the kernel threads touch the pages themselves
        results = fit_mapped()
    elif threads > 1 and len(work) > 1:
        pieces = [ab for r in work for ab in cut(*r)]
        results = list(_kernel_pool(threads).map(lambda ab: fit(load(*ab, 0)), pieces))
    elif len(work) == 1:  # one read: nothing to overlap it with, so no read-ahead thread (small tensors)
        (r0, r1) = work[0]
        xs = load(r0, r1, 0)
        results = [fit([x[(a - r0) * cols : (b - r0) * cols] for x in xs]) for a, b in cut(r0, r1)]
    else:
        pool = reader.prefetcher()
        nxt = pool.submit(load, *work[0], 0) if work else None
        for i, (r0, r1) in enumerate(work):
            xs = nxt.result()  # type: ignore[union-attr]
            nxt = pool.submit(load, *work[i + 1], (i + 1) % 2) if i + 1 < len(work) else None
            results += [fit([x[(a - r0) * cols : (b - r0) * cols] for x in xs]) for a, b in cut(r0, r1)]
    totals = [np.zeros((k + 1, k + 1)), np.zeros(k + 1), np.zeros(2 * k, dtype=np.int64)]
    totals += [np.zeros((k + 1, k + 1)), np.zeros((k + 1, cols)), np.zeros(k)]
    for res in results:  # in piece order
        if isinstance(res, list):
            count_nonfinite(st, order, [nonfinite_np(x) for x in res])
            continue
        for t, v in zip(totals, res[:-1]):
            t += v
        st.n += res[-1]
    gram, sums, counts, rowgram, colsum, dropped = totals
    st.dropped = [float(x) for x in dropped]
    st.gram, st.sums, st.rowgram, st.colsum = gram, sums, rowgram, colsum
    st.exact = [int(e) for e in counts[:k]]
    st.near = [int(e) for e in counts[k:]]
    return st
