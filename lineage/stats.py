"""Sufficient statistics of one comparison, accumulated in one streaming pass.

For a suspect s and paired candidates p_1..p_k the pass accumulates, in
float64, the Gram matrix of the columns

    Y = [ r,  p_2 - r, ..., p_k - r,  s - r ]      (r = p_1, the reference)

plus their sums, the element count and, per candidate, how many elements are
bit-equal to the suspect. Everything the fit reports (cosines, correlations,
distances, single-parent and blend fits relative to any candidate as base)
is a quadratic form in these numbers, so the bytes are read exactly once.

Why differences from a reference rather than the raw Gram of [p, s]: related
checkpoints differ by a few percent or less, and distances recovered from a
raw Gram (|a|^2 - 2 a.b + |b|^2) lose as many digits as the ratio
|w|^2 / |delta|^2 has. Forming the differences element by element first
keeps the small quantities small from the start; only the reference column
is large. Chunk partial sums are added in float64 (blocked summation).

Stats are additive, so a huge tensor can be split into row ranges across
workers and the partial stats summed exactly (up to float64 addition order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lineage.align import Group
from lineage.views import Reader


@dataclass
class Stats:
    order: list[str]  # candidates in column order; order[0] is the reference
    n: int = 0
    gram: torch.Tensor = field(default=None)  # type: ignore[assignment]
    sums: torch.Tensor = field(default=None)  # type: ignore[assignment]
    exact: list[int] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0

    def __post_init__(self) -> None:
        m = len(self.order) + 1
        if self.gram is None:
            self.gram = torch.zeros(m, m, dtype=torch.float64)
        if self.sums is None:
            self.sums = torch.zeros(m, dtype=torch.float64)
        if not self.exact:
            self.exact = [0] * len(self.order)

    def merge(self, other: Stats) -> Stats:
        """Add the stats of another row range of the same comparison."""
        if other.order != self.order:
            raise ValueError("cannot merge stats of different candidate orders")
        self.n += other.n
        self.gram += other.gram
        self.sums += other.sums
        self.exact = [a + b for a, b in zip(self.exact, other.exact)]
        for k, v in other.nonfinite.items():
            self.nonfinite[k] = self.nonfinite.get(k, 0) + v
        self.bytes_read += other.bytes_read
        return self

    def to_dict(self) -> dict:
        return {
            "order": list(self.order),
            "n": self.n,
            "gram": self.gram.flatten().tolist(),
            "sums": self.sums.tolist(),
            "exact": list(self.exact),
            "nonfinite": dict(self.nonfinite),
            "bytes_read": self.bytes_read,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        m = len(d["order"]) + 1
        return cls(
            order=list(d["order"]),
            n=int(d["n"]),
            gram=torch.tensor(d["gram"], dtype=torch.float64).reshape(m, m),
            sums=torch.tensor(d["sums"], dtype=torch.float64),
            exact=[int(x) for x in d["exact"]],
            nonfinite=dict(d.get("nonfinite") or {}),
            bytes_read=int(d.get("bytes_read", 0)),
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


def accumulate(
    group: Group,
    reader: Reader,
    chunk_bytes: int,
    rows: tuple[int, int] | None = None,
    base: str | None = None,
    device: str = "cpu",
) -> Stats:
    """Stream rows `rows` (default all) of every side of `group` into Stats.

    On `device="cuda"` the float64 arithmetic runs on the GPU (float64 keeps
    TF32 out of the picture); the statistics come back to the CPU.
    """
    assert group.view is not None
    order = column_order(group, base)
    views = {s.candidate: s.view for s in group.paired}
    st = Stats(order)
    a, b = rows if rows is not None else (0, group.view.rows)
    step = rows_per_chunk(group, chunk_bytes)
    m = len(order) + 1
    before = reader.bytes_read
    for r0 in range(a, b, step):
        r1 = min(b, r0 + step)
        s = reader.read(group.view, r0, r1).reshape(-1).to(device)
        ps = [reader.read(views[c], r0, r1).reshape(-1).to(device) for c in order]  # type: ignore[arg-type]
        bad = {}
        for label, x in [("suspect", s), *zip(order, ps)]:
            nf = x.numel() - int(torch.isfinite(x).sum())
            if nf:
                bad[label] = nf
        if bad:
            for k, v in bad.items():
                st.nonfinite[k] = st.nonfinite.get(k, 0) + v
            continue
        for i, p in enumerate(ps):
            st.exact[i] += int((s == p).sum())
        y = torch.empty(s.numel(), m, dtype=torch.float64, device=device)
        ref = ps[0].to(torch.float64)
        y[:, 0] = ref
        for j, p in enumerate(ps[1:], start=1):
            torch.sub(p.to(torch.float64), ref, out=y[:, j])
        torch.sub(s.to(torch.float64), ref, out=y[:, m - 1])
        st.gram += (y.T @ y).cpu()
        st.sums += y.sum(0).cpu()
        st.n += s.numel()
    st.bytes_read = reader.bytes_read - before
    return st
