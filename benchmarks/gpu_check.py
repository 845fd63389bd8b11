"""Verify and time the GPU fit against the CPU fit on the same tensors.

    python -m benchmarks.gpu_check [--dir /tmp/lineage-bench] [--tensors 8]

Builds a synthetic BF16 trio (4096 x 8192 matrices, 64 MiB each per model),
accumulates every tensor's statistics on the CPU and on CUDA, and checks
that every reported number (per-candidate cosine, correlation, distance,
blend weights, residual, R^2) agrees within 1e-6 relative. Prints GB/s for
both and exits 1 on any disagreement, 2 when no GPU is visible.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.synth import make_trio
from lineage.align import align
from lineage.engines import accumulate
from lineage.fit import blend, single
from lineage.options import FitOptions
from lineage.reader import Reader
from lineage.source import resolve


def numbers(st) -> dict[str, float]:
    out = {}
    for c in st.order:
        s = single(st, c)
        out |= {f"{c}.cos": s.cosine, f"{c}.corr": s.corr, f"{c}.dist": s.rel_dist}
    b = blend(st)
    out |= {f"w.{k}": v for k, v in b.weights.items()} | {"resid": b.residual_rel, "r2": b.r2}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/lineage-bench")
    ap.add_argument("--tensors", type=int, default=8)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    root = make_trio(Path(a.dir) / "gpu", a.tensors, 4096, 8192)
    groups, _ = align(resolve("blend", str(root["blend"])), [resolve(n, str(root[n])) for n in ("base", "tune")])
    worst, times = 0.0, {}
    results = {}
    for device in ("cpu", "cuda"):
        with Reader() as r:
            for g in groups:  # warm the page cache and CUDA once
                accumulate(g, r, FitOptions(device=device))
            torch.cuda.synchronize()
            t = time.perf_counter()
            results[device] = [numbers(accumulate(g, r, FitOptions(device=device))) for g in groups]
            torch.cuda.synchronize()
            times[device] = time.perf_counter() - t
    nbytes = sum(g.nbytes for g in groups)
    for cpu, gpu in zip(results["cpu"], results["cuda"]):
        for k, v in cpu.items():
            rel = abs(v - gpu[k]) / max(abs(v), 1e-30)
            worst = max(worst, rel if math.isfinite(rel) else math.inf)
    for d, t in times.items():
        print(f"{d:>5}: {nbytes / t / 1e9:6.2f} GB/s over {nbytes / 1e9:.2f} GB")
    print(f"gpu/cpu speed: {times['cpu'] / times['cuda']:.2f}x; worst relative disagreement {worst:.2e} (limit 1e-6)")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
