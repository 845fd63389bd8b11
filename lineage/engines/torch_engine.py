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
    return accumulate_shared([views[0]], views[1:], order, reader, chunk_bytes, ranges, device)[0]


def accumulate_shared(
    suspects: list, cands: list, order: list[str], reader: Reader, chunk_bytes: int, ranges, device: str, keep: list | None = None
) -> list[Stats]:
    """Several suspects against the same candidate views: each candidate chunk is read
    (and moved to `device`) once, then every suspect's rows are fitted against it.
    `keep`: as kernel.accumulate_shared (the reference's and each suspect's first rows,
    as float32 arrays)."""
    import torch  # only this engine needs it: workers on the kernel path never import torch

    cols = cands[0].cols
    m = len(order) + 1
    acc = []
    for s in suspects:
        acc.append(
            {
                "st": Stats(order, cols=cols),
                "colsum": torch.zeros(m, cols, dtype=torch.float64, device=device),
                "gram": torch.zeros(m, m, dtype=torch.float64),
                "sums": torch.zeros(m, dtype=torch.float64),
                "rowgram": torch.zeros(m, m, dtype=torch.float64),
                "tols": [view_tolerance(s.dtype, v.dtype) for v in cands],
            }
        )
    for i, (r0, r1) in enumerate(chunks(ranges, rows_per_chunk([cands[0], *cands], chunk_bytes))):
        ps = [decoded(reader, v, r0, r1).reshape(-1).to(device) for v in cands]
        cbad = [x.numel() - int(torch.isfinite(x).sum()) for x in ps]
        ref = ps[0].to(torch.float64)
        sample = keep is not None and i == 0
        if sample:
            from lineage.engines.kernel import keep_rows

            n = min(r1 - r0, keep_rows(cols, len(suspects))) * cols
            keep.append(ps[0][:n].float().cpu().numpy().copy())  # type: ignore[union-attr]
        for s, a in zip(suspects, acc):
            sx = decoded(reader, s, r0, r1).reshape(-1).to(device)
            if sample:
                keep.append(sx[:n].float().cpu().numpy().copy())  # type: ignore[union-attr]
            st = a["st"]
            if count_nonfinite(st, order, [sx.numel() - int(torch.isfinite(sx).sum()), *cbad]):
                continue
            y = torch.empty(sx.numel(), m, dtype=torch.float64, device=device)
            y[:, 0] = ref
            for j, p in enumerate(ps[1:], start=1):
                torch.sub(p.to(torch.float64), ref, out=y[:, j])
            torch.sub(sx.to(torch.float64), ref, out=y[:, m - 1])
            kept_ref = None
            for i, p in enumerate(ps):
                st.exact[i] += int((sx == p).sum())
                d = sx.to(torch.float64) - p.to(torch.float64)
                close = d.abs() <= a["tols"][i] * p.to(torch.float64).abs()
                st.near[i] += int(close.sum())
                if i == 0:
                    kept_ref = close
                else:  # y[:, i] is p_i - r
                    st.dropped[i] += float(y[:, i][kept_ref].pow(2).sum())
            a["gram"] += (y.T @ y).cpu()
            a["sums"] += y.sum(0).cpu()
            by_row = y.view(-1, cols, m)
            rs = by_row.sum(1)
            a["rowgram"] += (rs.T @ rs).cpu()
            a["colsum"] += by_row.sum(0).T
            st.n += sx.numel()
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
    return out
