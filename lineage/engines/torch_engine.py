"""The torch engine: the streaming pass in float64 on any device.

What runs on GPU actors (the same float64 arithmetic on CUDA; float64 keeps
TF32 out of the picture), and the fallback where the C kernel does not
apply: float64 inputs, more candidates than it takes, or no compiled
extension. Reads are sized so the float64 working set of one chunk stays
within `chunk_bytes` (FitOptions.chunk_bytes).
"""

from __future__ import annotations

from lineage.decode import decoded
from lineage.dtypes import view_tolerance
from lineage.engines import count_nonfinite
from lineage.reader import Reader
from lineage.sampling import chunks
from lineage.stats import Stats

#: Sides the float64 working set is sized for, whatever the call has (so the rows
#: per read, and with them the order of additions, do not depend on it).
SIDES = 10


def rows_per_chunk(views: list, chunk_bytes: int) -> int:
    """Rows per read so the float64 working set (differences and products) stays under `chunk_bytes`."""
    per_row = views[0].cols * 8 * SIDES * 2
    return max(1, chunk_bytes // per_row)


def accumulate(views: list, order: list[str], reader: Reader, chunk_bytes: int, ranges, device: str) -> Stats:
    """Stats of `views` (suspect first, then `order`) over `ranges`, in float64 on `device`."""
    idx = list(range(len(views) - 1))
    return accumulate_shared([views[0]], views[1:], [idx], [order], reader, chunk_bytes, ranges, device)[0][0]


def accumulate_shared(
    suspects: list,
    cands: list,
    subsets: list[list[int]],
    orders: list[list[str]],
    reader: Reader,
    chunk_bytes: int,
    ranges,
    device: str,
    keep: list | None = None,
) -> tuple[list[Stats], list[int]]:
    """Several suspects, each against its subset of the same candidate views (see
    kernel.accumulate_shared): each candidate chunk is read (and moved to `device`)
    once, then every suspect's rows are fitted against its candidates. `keep`: the first
    rows of cands[0] and of each suspect, as float32. Also returns the bytes read per
    view (suspects, then candidates)."""
    import torch  # only this engine needs it: workers on the kernel path never import torch

    cols = cands[0].cols
    read = [0] * (len(suspects) + len(cands))
    acc = []
    for s, sub, order in zip(suspects, subsets, orders):
        m = len(order) + 1
        acc.append(
            {
                "st": Stats(order, cols=cols),
                "colsum": torch.zeros(m, cols, dtype=torch.float64, device=device),
                "gram": torch.zeros(m, m, dtype=torch.float64),
                "sums": torch.zeros(m, dtype=torch.float64),
                "rowgram": torch.zeros(m, m, dtype=torch.float64),
                "tols": [view_tolerance(s.dtype, cands[j].dtype) for j in sub],
            }
        )

    def load(k: int, v, r0: int, r1: int):
        before = reader.bytes_read
        x = decoded(reader, v, r0, r1).reshape(-1).to(device)
        read[k] += reader.bytes_read - before
        return x

    for i, (r0, r1) in enumerate(chunks(ranges, rows_per_chunk(cands, chunk_bytes))):
        cx = [load(len(suspects) + j, v, r0, r1) for j, v in enumerate(cands)]
        cbad = [x.numel() - int(torch.isfinite(x).sum()) for x in cx]
        if keep is not None and i == 0:
            from lineage.engines.kernel import keep_rows

            n = min(r1 - r0, keep_rows(cols, len(suspects))) * cols
            keep.extend(x[:n].float().cpu().numpy().copy() for x in cx)
        for k, (s, sub, a) in enumerate(zip(suspects, subsets, acc)):
            sx = load(k, s, r0, r1)
            if keep is not None and i == 0:
                keep.append(sx[:n].float().cpu().numpy().copy())
            st, ps = a["st"], [cx[j] for j in sub]
            if count_nonfinite(st, st.order, [sx.numel() - int(torch.isfinite(sx).sum()), *[cbad[j] for j in sub]]):
                continue
            add_chunk(a, sx, ps, cols, device)
    out = []
    for a in acc:
        st = a["st"]
        st.gram, st.sums, st.rowgram, st.colsum = (
            a["gram"].numpy(),
            a["sums"].numpy(),
            a["rowgram"].numpy(),
            a["colsum"].cpu().numpy(),
        )
        out.append(st)
    return out, read


def stats_of(s, ps: list, order: list[str], tols: list[float]) -> Stats:
    """Stats of a suspect matrix `s` against candidates `ps` already in memory (2-D torch
    tensors of one shape, e.g. transformed into the suspect's gauge: lineage/gauge_work.py)."""
    import torch

    cols = s.shape[1]
    m = len(order) + 1
    a = {
        "st": Stats(order, cols=cols),
        "colsum": torch.zeros(m, cols, dtype=torch.float64),
        "gram": torch.zeros(m, m, dtype=torch.float64),
        "sums": torch.zeros(m, dtype=torch.float64),
        "rowgram": torch.zeros(m, m, dtype=torch.float64),
        "tols": tols,
    }
    st = a["st"]
    sx, px = s.reshape(-1), [p.reshape(-1) for p in ps]
    bad = [x.numel() - int(torch.isfinite(x).sum()) for x in (sx, *px)]
    if not count_nonfinite(st, order, bad):
        add_chunk(a, sx, px, cols, "cpu")
    st.gram, st.sums, st.rowgram, st.colsum = a["gram"].numpy(), a["sums"].numpy(), a["rowgram"].numpy(), a["colsum"].numpy()
    return st


def add_chunk(a: dict, sx, ps: list, cols: int, device: str) -> None:
    """Add one chunk (flattened whole rows) of a suspect and its candidates to the accumulators `a`."""
    import torch

    st = a["st"]
    m = len(ps) + 1
    ref = ps[0].to(torch.float64)
    y = torch.empty(sx.numel(), m, dtype=torch.float64, device=device)
    y[:, 0] = ref
    for j, p in enumerate(ps[1:], start=1):
        torch.sub(p.to(torch.float64), ref, out=y[:, j])
    torch.sub(sx.to(torch.float64), ref, out=y[:, m - 1])
    kept_ref = None
    for q, p in enumerate(ps):
        st.exact[q] += int((sx == p).sum())
        d = sx.to(torch.float64) - p.to(torch.float64)
        close = d.abs() <= a["tols"][q] * p.to(torch.float64).abs()
        st.near[q] += int(close.sum())
        if q == 0:
            kept_ref = close
        else:  # y[:, q] is p_q - r
            st.dropped[q] += float(y[:, q][kept_ref].pow(2).sum())
    a["gram"] += (y.T @ y).cpu()
    a["sums"] += y.sum(0).cpu()
    by_row = y.view(-1, cols, m)
    rs = by_row.sum(1)
    a["rowgram"] += (rs.T @ rs).cpu()
    a["colsum"] += by_row.sum(0).T
    st.n += sx.numel()
