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


def rows_per_chunk(views: list, chunk_bytes: int) -> int:
    """Rows per read so the float64 working set (differences and products) stays under `chunk_bytes`."""
    per_row = views[0].cols * 8 * (len(views) + 1) * 2
    return max(1, chunk_bytes // per_row)


def accumulate(views: list, order: list[str], reader: Reader, chunk_bytes: int, ranges, device: str) -> Stats:
    """Stats of `views` (suspect first, then `order`) over `ranges`, in float64 on `device`."""
    import torch  # only this engine needs it: workers on the kernel path never import torch

    cols = views[0].cols
    st = Stats(order, cols=cols)
    colsum = torch.zeros(len(order) + 1, cols, dtype=torch.float64, device=device)
    gram = torch.zeros(len(order) + 1, len(order) + 1, dtype=torch.float64)
    sums, rowgram = torch.zeros(len(order) + 1, dtype=torch.float64), torch.zeros_like(gram)
    tols = [view_tolerance(views[0].dtype, v.dtype) for v in views[1:]]
    m = len(order) + 1
    for r0, r1 in chunks(ranges, rows_per_chunk(views, chunk_bytes)):
        s, *ps = [decoded(reader, v, r0, r1).reshape(-1).to(device) for v in views]
        if count_nonfinite(st, order, [x.numel() - int(torch.isfinite(x).sum()) for x in (s, *ps)]):
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
