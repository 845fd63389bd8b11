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


#: Elements per side per read (2 MiB of BF16, 4 MiB of float32). Each read goes
#: to the kernel as KERNEL_SPLIT row pieces: large enough that the per-piece
#: Python work (buffers, maps, the call) is noise, and the same pieces whatever
#: the thread count, the number of candidates in the call and their dtypes, so
#: the order of float64 additions (and the result) depends on none of them: a
#: suspect fitted in a bulk audit against a subset of the candidates read gets
#: the bits its own audit gets.
KERNEL_VIEW_ELEMENTS = 1 << 20
#: Sides the `fit.chunk_mb` budget is shared between when it is smaller
#: (a suspect and up to the kernel's eight candidates).
KERNEL_SIDES = 9
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


class _Pass:
    """What one pass over row chunks shares: the chunking (which fixes the order of
    float64 additions), how rows are loaded, and the kernel call on a piece."""

    def __init__(
        self, suspect: object, cands: list, reader: Reader, chunk_bytes: int, ranges, suspects: list | None = None
    ) -> None:
        views = [*(suspects or [suspect]), *cands]
        self.k, self.cols = len(cands), cands[0].cols
        self.raw = _raw_bf16(views)
        self.step = step_rows(self.cols, chunk_bytes)
        self.fn = _kernel.accumulate_bf16 if self.raw else _kernel.accumulate_f32
        self.reader = reader
        self.work = chunks(ranges, self.step)

    def tols(self, suspect, cands: list) -> np.ndarray:
        return np.array([view_tolerance(suspect.dtype, v.dtype) for v in cands], dtype=np.float64)

    def load(self, views: list, r0: int, r1: int, slot: int, first: int = 0) -> list[np.ndarray]:
        """Rows [r0, r1) of `views` as kernel input. BF16 goes into reused buffers (`slot`
        alternates, so a read never lands in the buffer being fitted; `first` offsets the
        buffers of the views of one call from another's)."""
        reader, cols = self.reader, self.cols
        if self.raw:
            nb = (r1 - r0) * cols * 2
            bufs = [reader.scratch(2 * (first + j) + slot, nb) for j in range(len(views))]
            return [np.frombuffer(reader.read_raw(v, r0, r1, b), dtype=np.uint16) for v, b in zip(views, bufs)]
        return [
            x if (x := as_float32(reader, v, r0, r1)) is not None else decoded(reader, v, r0, r1).reshape(-1).numpy()
            for v in views
        ]

    def fit(self, xs: list[np.ndarray], tols: np.ndarray) -> tuple | list[np.ndarray]:
        return fit_piece(self.fn, xs, tols, self.cols)

    def cut(self, r0: int, r1: int) -> list[tuple[int, int]]:
        cuts = [r0 + (r1 - r0) * j // KERNEL_SPLIT for j in range(KERNEL_SPLIT + 1)]
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]

    def pieces(self, xs: list[np.ndarray], r0: int, r1: int) -> list[list[np.ndarray]]:
        c = self.cols
        return [[x[(a - r0) * c : (b - r0) * c] for x in xs] for a, b in self.cut(r0, r1)]


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
    ps = _Pass(views[0], views[1:], reader, chunk_bytes, ranges)
    tols = ps.tols(views[0], views[1:])
    work = ps.work

    def fit(xs: list[np.ndarray]) -> tuple | list[np.ndarray]:
        return ps.fit(xs, tols)

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
            _unmap(reader, views, mvs, r0, r1, last)

        try:
            for i, (r0, r1) in enumerate(work):
                last = i == len(work) - 1 or work[i + 1][0] != r1
                mvs = [reader.map_rows(v, r0, r1) for v in views]  # one segment per view: never None
                parts = ps.pieces([np.frombuffer(m, dtype=np.uint16) for m in mvs], r0, r1)  # type: ignore[arg-type]
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

    results: list = []
    if ps.raw and mmap_ok and all(len(v.segments) == 1 and reader.mappable(v) for v in views):
        results = fit_mapped()  # no copy and no read thread: the kernel threads touch the pages themselves
    elif threads > 1 and len(work) > 1:
        pieces = [ab for r in work for ab in ps.cut(*r)]
        results = list(_kernel_pool(threads).map(lambda ab: fit(ps.load(views, *ab, 0)), pieces))
    elif len(work) == 1:  # one read: nothing to overlap it with, so no read-ahead thread (small tensors)
        (r0, r1) = work[0]
        results = [fit(part) for part in ps.pieces(ps.load(views, r0, r1, 0), r0, r1)]
    else:
        pool = reader.prefetcher()
        nxt = pool.submit(ps.load, views, *work[0], 0) if work else None
        for i, (r0, r1) in enumerate(work):
            xs = nxt.result()  # type: ignore[union-attr]
            nxt = pool.submit(ps.load, views, *work[i + 1], (i + 1) % 2) if i + 1 < len(work) else None
            results += [fit(part) for part in ps.pieces(xs, r0, r1)]
    return totals_of(results, order, ps.cols)


def step_rows(cols: int, chunk_bytes: int) -> int:
    """Rows per read: KERNEL_VIEW_ELEMENTS per side, less when `fit.chunk_mb` is smaller."""
    return max(1, min(KERNEL_VIEW_ELEMENTS, chunk_bytes // (4 * KERNEL_SIDES)) // cols)


def _rows_of(reader: Reader, v, r0: int, r1: int, slot: int, mappable: bool) -> tuple[np.ndarray, memoryview | None]:
    """Rows [r0, r1) of one view as kernel input: BF16 bits in place in the page cache
    (returning the map to release), BF16 bits read into a reused buffer, or float32."""
    if _raw_bf16([v]):
        if mappable:
            m = reader.map_rows(v, r0, r1)
            return np.frombuffer(m, dtype=np.uint16), m  # type: ignore[arg-type]
        buf = reader.scratch(slot, (r1 - r0) * v.cols * 2)
        return np.frombuffer(reader.read_raw(v, r0, r1, buf), dtype=np.uint16), None
    x = as_float32(reader, v, r0, r1)
    return (x if x is not None else decoded(reader, v, r0, r1).reshape(-1).numpy()), None


def _as_f32(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32) if x.dtype == np.uint16 else x


def accumulate_shared(
    suspects: list,
    cands: list,
    subsets: list[list[int]],
    orders: list[list[str]],
    reader: Reader,
    chunk_bytes: int,
    ranges,
    threads: int = 1,
    mmap_ok: bool = True,
    keep: list | None = None,
) -> tuple[list[Stats], list[int]]:
    """Several suspects, each against its own subset of the same candidates, every
    candidate row read once.

    The candidates' rows of a chunk are loaded (or mapped) once; then each
    suspect's rows in turn, fitted against its candidates (`subsets[k]`,
    indices into `cands`, in its column order `orders[k]`) in the same
    pieces as its own audit (the chunking depends only on the shapes), so
    each suspect's Stats equal, bit for bit, those of its own audit. One
    suspect's rows are held at a time: memory does not grow with their
    number. With `keep` (a list to fill), the first rows of the first chunk
    of every candidate, then of every suspect, are copied into it: the
    sample relations.py compares the suspects on, at no extra read. Also returns
    the bytes read per view (suspects, then candidates)."""
    assert _kernel is not None
    cols = cands[0].cols
    work = chunks(ranges, step_rows(cols, chunk_bytes))
    tols = [np.array([view_tolerance(s.dtype, cands[j].dtype) for j in sub]) for s, sub in zip(suspects, subsets)]
    can_map = [mmap_ok and len(v.segments) == 1 and reader.mappable(v) for v in [*suspects, *cands]]
    read = [0] * (len(suspects) + len(cands))
    results: list[list] = [[] for _ in suspects]

    def load(k: int, v, r0: int, r1: int) -> tuple[np.ndarray, memoryview | None]:
        before = reader.bytes_read
        x, m = _rows_of(reader, v, r0, r1, 2 * k, can_map[k])
        read[k] += reader.bytes_read - before
        return x, m

    for i, (r0, r1) in enumerate(work):
        last = i == len(work) - 1 or work[i + 1][0] != r1
        loaded = [load(len(suspects) + j, v, r0, r1) for j, v in enumerate(cands)]
        cx = [x for x, _ in loaded]
        n = min(r1 - r0, keep_rows(cols, len(suspects))) * cols
        if keep is not None and i == 0:
            keep.extend(x[:n].copy() for x in cx)
        for k, s in enumerate(suspects):
            sx, sm = load(k, s, r0, r1)
            if keep is not None and i == 0:
                keep.append(sx[:n].copy())
            xs = [sx] + [cx[j] for j in subsets[k]]
            if any(x.dtype != np.uint16 for x in xs):  # a call mixing BF16 bits with float32: all as float32 (same bits)
                xs = [_as_f32(x) for x in xs]
            fn = _kernel.accumulate_bf16 if xs[0].dtype == np.uint16 else _kernel.accumulate_f32
            cuts = [r0 + (r1 - r0) * q // KERNEL_SPLIT for q in range(KERNEL_SPLIT + 1)]
            parts = [[x[(a - r0) * cols : (b - r0) * cols] for x in xs] for a, b in zip(cuts, cuts[1:]) if b > a]
            if threads > 1:
                results[k] += list(_kernel_pool(threads).map(lambda part, t=tols[k], f=fn: fit_piece(f, part, t, cols), parts))
            else:
                results[k] += [fit_piece(fn, part, tols[k], cols) for part in parts]
            del sx, xs, parts
            if sm is not None:
                _unmap(reader, [s], [sm], r0, r1, last)
        del cx
        for v, (_, m) in zip(cands, loaded):
            if m is not None:
                _unmap(reader, [v], [m], r0, r1, last)
    return [totals_of(r, orders[k], cols) for k, r in enumerate(results)], read


def fit_piece(fn, xs: list[np.ndarray], tols: np.ndarray, cols: int) -> tuple | list[np.ndarray]:
    """Stats arrays and element count of one piece (suspect, then candidates); its inputs
    instead if they hold non-finite values."""
    k = len(xs) - 1
    out = (np.zeros((k + 1, k + 1)), np.zeros(k + 1), np.zeros(2 * k, dtype=np.int64))
    rg, cs, dr = np.zeros((k + 1, k + 1)), np.zeros((k + 1, cols)), np.zeros(k)
    fn(*out, tols, xs[0], tuple(xs[1:]), cols, cs, rg, dr)
    if not (np.isfinite(out[0]).all() and np.isfinite(out[1]).all()):
        return [x.copy() for x in xs]
    return (*out, rg, cs, dr, xs[0].size)


def stats_of_arrays(xs: list[np.ndarray], order: list[str], tols: np.ndarray, cols: int) -> Stats:
    """Stats of rows already in memory (uint16 BF16 bits or float32), one piece."""
    assert _kernel is not None
    fn = _kernel.accumulate_bf16 if xs[0].dtype == np.uint16 else _kernel.accumulate_f32
    return totals_of([fit_piece(fn, xs, tols, cols)], order, cols)


def keep_rows(cols: int, n_suspects: int) -> int:
    """Rows of each suspect kept for the relations (relations.relation_elements of them)."""
    from lineage.relations import relation_elements

    return max(1, relation_elements(n_suspects) // cols)


def _unmap(reader: Reader, views: list, mvs: list, r0: int, r1: int, last: bool) -> None:
    for v, m in zip(views, mvs):
        try:
            m.release()
        except BufferError:  # an exception's traceback still holds the arrays
            pass
        reader.unmap_rows(v, r0, r1, last)


def totals_of(results: list, order: list[str], cols: int) -> Stats:
    """One Stats from the pieces' results, added in piece order."""
    k = len(order)
    st = Stats(order, cols=cols)
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
