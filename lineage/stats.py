"""Sufficient statistics of one comparison, accumulated in one streaming pass.

For a suspect s and paired candidates p_1..p_k the pass accumulates, in
float64, the Gram matrix of the columns

    Y = [ r,  p_2 - r, ..., p_k - r,  s - r ]      (r = p_1, the reference)

plus their sums, the element count and, per candidate, how many elements are
bit-equal to the suspect. Seen as a matrix (rows x cols), it also keeps the
sums of every row and every column of each Y column: the Gram of the row
sums (`rowgram`) and the column sums themselves (`colsum`, folded into their
Gram `colgram` once a tensor is complete). With them `fit.single` measures a
correlation against its permutation null (rows and columns of one side
shuffled), which knows about a shared mean row or column; see fit.py. Everything the fit reports (cosines, correlations,
distances, single-parent and blend fits relative to any candidate as base)
is a quadratic form in these numbers, so the bytes are read exactly once.

Why differences from a reference rather than the raw Gram of [p, s]: related
checkpoints differ by a few percent or less, and distances recovered from a
raw Gram (|a|^2 - 2 a.b + |b|^2) lose as many digits as the ratio
|w|^2 / |delta|^2 has. Forming the differences element by element first
keeps the small quantities small from the start; only the reference column
is large. Chunk partial sums are added in float64 (blocked summation).

Two engines compute the same numbers: `lineage._kernel` (C, one pass over
the raw bytes, CPU) and torch (any device, and the fallback where the
extension was not built). They differ only in the order of float64
additions (relative differences around 1e-13).

Stats are additive, so a huge tensor can be split into row ranges across
workers and the partial stats summed exactly (up to float64 addition order).
"""

from __future__ import annotations

import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from lineage.align import Group
from lineage.dtypes import rounding_tolerance
from lineage.views import Reader

try:  # the compiled inner loop; the torch path below computes the same numbers
    from lineage import _kernel
except ImportError:  # pragma: no cover - built without a C compiler
    _kernel = None


@dataclass
class Stats:
    order: list[str]  # candidates in column order; order[0] is the reference
    n: int = 0
    gram: np.ndarray = field(default=None)  # type: ignore[assignment]
    sums: np.ndarray = field(default=None)  # type: ignore[assignment]
    exact: list[int] = field(default_factory=list)
    near: list[int] = field(default_factory=list)  # within storage rounding of the suspect
    # per candidate j >= 1: sum of (p_j - r)^2 where the suspect is within rounding of r (entry 0: 0)
    dropped: list[float] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    cols: int = 1  # of the matrix the elements come from (rows = n // cols)
    rowgram: np.ndarray = field(default=None)  # type: ignore[assignment]  # Gram of per-row sums
    colsum: np.ndarray | None = None  # m x cols; None once folded into colgram
    colgram_: np.ndarray | None = None  # Gram of per-column sums, when colsum is gone

    def __post_init__(self) -> None:
        m = len(self.order) + 1
        if self.gram is None:
            self.gram = np.zeros((m, m))
        if self.sums is None:
            self.sums = np.zeros(m)
        if self.rowgram is None:
            self.rowgram = np.zeros((m, m))
        if self.colsum is None and self.colgram_ is None:
            self.colsum = np.zeros((m, self.cols))
        if not self.exact:
            self.exact = [0] * len(self.order)
        if not self.near:
            self.near = [0] * len(self.order)
        if not self.dropped:
            self.dropped = [0.0] * len(self.order)

    def merge(self, other: Stats) -> Stats:
        """Add the stats of another row range of the same comparison."""
        if other.order != self.order:
            raise ValueError("cannot merge stats of different candidate orders")
        if other.cols != self.cols or self.colsum is None or other.colsum is None:
            raise ValueError("cannot merge stats of different shapes, or already folded")
        self.n += other.n
        self.gram += other.gram
        self.sums += other.sums
        self.rowgram += other.rowgram
        self.colsum += other.colsum
        self.exact = [a + b for a, b in zip(self.exact, other.exact)]
        self.near = [a + b for a, b in zip(self.near, other.near)]
        self.dropped = [a + b for a, b in zip(self.dropped, other.dropped)]
        for k, v in other.nonfinite.items():
            self.nonfinite[k] = self.nonfinite.get(k, 0) + v
        self.bytes_read += other.bytes_read
        return self

    @property
    def rows(self) -> int:
        return self.n // self.cols

    @property
    def colgram(self) -> np.ndarray:
        return self.colsum @ self.colsum.T if self.colsum is not None else self.colgram_  # type: ignore[return-value]

    def fold(self) -> Stats:
        """Replace the column sums by their Gram: small, but no longer mergeable.

        Done for a tensor read whole, so only row ranges of split tensors
        carry cols floats per column of Y to the reducer."""
        if self.colsum is not None:
            self.colgram_, self.colsum = self.colgram, None
        return self

    def to_dict(self) -> dict:
        """Plain values for the trip from a worker to the reducer (column sums as an array)."""
        return {
            "order": list(self.order),
            "n": self.n,
            "gram": self.gram.flatten().tolist(),
            "sums": self.sums.tolist(),
            "exact": list(self.exact),
            "near": list(self.near),
            "dropped": list(self.dropped),
            "nonfinite": dict(self.nonfinite),
            "bytes_read": self.bytes_read,
            "cols": self.cols,
            "rowgram": self.rowgram.flatten().tolist(),
            "colsum": None if self.colsum is None else self.colsum.copy(),
            "colgram": None if self.colgram_ is None else self.colgram_.flatten().tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        """Inverse of to_dict; also reads rows written before the row/column sums existed
        (they then get the structure-free null, see fit.single)."""
        m = len(d["order"]) + 1

        def mat(x) -> np.ndarray | None:
            return None if x is None or len(x) == 0 else np.array(x, dtype=np.float64).reshape(m, -1)

        cols = int(d.get("cols") or 1)
        colsum, colgram = mat(d.get("colsum")), mat(d.get("colgram"))
        rowgram = mat(d.get("rowgram"))
        if rowgram is None:  # no structure recorded: every element its own row
            cols, colgram = 1, np.zeros((m, m))
        return cls(
            order=list(d["order"]),
            n=int(d["n"]),
            gram=np.array(d["gram"], dtype=np.float64).reshape(m, m),
            sums=np.array(d["sums"], dtype=np.float64),
            exact=[int(x) for x in d["exact"]],
            near=[int(x) for x in d.get("near") or []],
            dropped=[float(x) for x in d.get("dropped") or []],
            nonfinite=dict(d.get("nonfinite") or {}),
            bytes_read=int(d.get("bytes_read", 0)),
            cols=cols,
            rowgram=rowgram,
            colsum=colsum,
            colgram_=colgram if colsum is None else None,
        )


def column_order(group: Group, base: str | None) -> list[str]:
    """Paired candidates, the declared base first when it is paired."""
    names = [s.candidate for s in group.paired]
    if base in names:
        names.remove(base)
        names.insert(0, base)
    return names


def rows_per_chunk(group: Group, chunk_bytes: int) -> int:
    """Rows per read so the float64 working set stays under `chunk_bytes`."""
    assert group.view is not None
    per_row = group.view.cols * 8 * (len(group.paired) + 2) * 2
    return max(1, chunk_bytes // per_row)


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


def chunks(ranges: list[tuple[int, int]], step: int) -> list[tuple[int, int]]:
    """Each range cut into pieces of at most `step` rows."""
    return [(r0, min(b, r0 + step)) for a, b in ranges for r0 in range(a, b, step)]


def accumulate(
    group: Group,
    reader: Reader,
    chunk_bytes: int,
    rows: tuple[int, int] | None = None,
    base: str | None = None,
    device: str = "cpu",
    sample_fraction: float = 1.0,
    engine: str = "auto",
    threads: int = 1,
) -> Stats:
    """Stream rows `rows` (default all) of every side of `group` into Stats.

    `sample_fraction` < 1 reads only an evenly spaced, deterministic subset
    of row blocks (each about 128K elements, 256 KiB of BF16), by byte range.
    `engine`: "kernel" (lineage._kernel, CPU only), "torch", or "auto" (the
    kernel where it applies). On `device="cuda"` the torch float64
    arithmetic runs on the GPU (float64 keeps TF32 out of the picture).
    `threads`: kernel threads (the cores the worker was given); the result
    does not depend on it.
    """
    assert group.view is not None
    a, b = rows if rows is not None else (0, group.view.rows)
    ranges = sample_ranges(a, b, max(1, 131072 // group.view.cols), sample_fraction, group.tensor)
    order = column_order(group, base)
    views = [group.view] + [next(s.view for s in group.paired if s.candidate == c) for c in order]
    use_kernel = engine == "kernel" or (engine == "auto" and device == "cpu" and kernel_applies(views))
    before = reader.bytes_read
    if use_kernel:
        st = _accumulate_kernel(views, order, reader, chunk_bytes, ranges, threads)
    else:
        st = _accumulate_torch(group, views, order, reader, chunk_bytes, ranges, device)
    st.bytes_read = reader.bytes_read - before
    return st


def _count_nonfinite(st: Stats, order: list[str], counts: list[int]) -> bool:
    """Record non-finite values per side (suspect first); True if the chunk has any."""
    for label, nf in zip(["suspect", *order], counts):
        if nf:
            st.nonfinite[label] = st.nonfinite.get(label, 0) + nf
    return any(counts)


def _nonfinite_np(x: np.ndarray) -> int:
    """Non-finite values in float32 values or BF16 bits (exponent all ones)."""
    if x.dtype == np.uint16:
        return int(np.count_nonzero((x & 0x7F80) == 0x7F80))
    return int(x.size - np.count_nonzero(np.isfinite(x)))


def _accumulate_torch(
    group: Group, views: list, order: list[str], reader: Reader, chunk_bytes: int, ranges, device: str
) -> Stats:
    import torch  # only this engine needs it: workers on the kernel path never import torch

    cols = views[0].cols
    st = Stats(order, cols=cols)
    colsum = torch.zeros(len(order) + 1, cols, dtype=torch.float64, device=device)
    gram = torch.zeros(len(order) + 1, len(order) + 1, dtype=torch.float64)
    sums, rowgram = torch.zeros(len(order) + 1, dtype=torch.float64), torch.zeros_like(gram)
    tols = near_tolerances(views)
    m = len(order) + 1
    for r0, r1 in chunks(ranges, rows_per_chunk(group, chunk_bytes)):
        s, *ps = [reader.read(v, r0, r1).reshape(-1).to(device) for v in views]
        if _count_nonfinite(st, order, [x.numel() - int(torch.isfinite(x).sum()) for x in (s, *ps)]):
            continue
        y = torch.empty(s.numel(), m, dtype=torch.float64, device=device)
        ref = ps[0].to(torch.float64)
        y[:, 0] = ref
        for j, p in enumerate(ps[1:], start=1):
            torch.sub(p.to(torch.float64), ref, out=y[:, j])
        torch.sub(s.to(torch.float64), ref, out=y[:, m - 1])
        kept_ref = None
        for i, p in enumerate(ps):
            st.exact[i] += int((s == p).sum())
            d = s.to(torch.float64) - p.to(torch.float64)
            close = d.abs() <= tols[i] * p.to(torch.float64).abs()
            st.near[i] += int(close.sum())
            if i == 0:
                kept_ref = close
            else:  # y[:, i] is p_i - r
                st.dropped[i] += float(y[:, i][kept_ref].pow(2).sum())
        gram += (y.T @ y).cpu()
        sums += y.sum(0).cpu()
        by_row = y.view(-1, cols, m)
        rs = by_row.sum(1)
        rowgram += (rs.T @ rs).cpu()
        colsum += by_row.sum(0).T
        st.n += s.numel()
    st.gram, st.sums, st.rowgram, st.colsum = gram.numpy(), sums.numpy(), rowgram.numpy(), colsum.cpu().numpy()
    return st


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


def near_tolerances(views: list) -> list[float]:
    """Per candidate, the relative distance that storage rounding explains."""
    s = views[0].dtype
    return [rounding_tolerance(s, v.dtype) if "mixed" not in (s, v.dtype) else 2.0**-4 for v in views[1:]]


def kernel_applies(views: list) -> bool:
    if _kernel is None or not 2 <= len(views) <= 9:
        return False
    return all(seg.dtype != "F64" for v in views for seg in v.segments)


def _raw_bf16(views: list) -> bool:
    return all(seg.dtype == "BF16" for v in views for seg in v.segments)


def _accumulate_kernel(
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
    tols = np.array(near_tolerances(views), dtype=np.float64)
    work = chunks(ranges, step)

    def load(r0: int, r1: int, slot: int) -> list[np.ndarray]:
        if raw:  # into reused buffers: `slot` alternates so a read never lands in the buffer being fitted
            nb = (r1 - r0) * cols * 2
            bufs = [reader.scratch(2 * j + slot, nb) for j in range(len(views))]
            return [np.frombuffer(reader.read_raw(v, r0, r1, b), dtype=np.uint16) for v, b in zip(views, bufs)]
        return [reader.read(v, r0, r1).reshape(-1).numpy() for v in views]

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
    mapped = raw and mmap_ok and all(len(v.segments) == 1 for v in views)
    if mapped:  # no copy and no read thread: the kernel threads touch the pages themselves
        results = fit_mapped()
    elif threads > 1:
        pieces = [ab for r in work for ab in cut(*r)]
        results = list(_kernel_pool(threads).map(lambda ab: fit(load(*ab, 0)), pieces))
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
            _count_nonfinite(st, order, [_nonfinite_np(x) for x in res])
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
