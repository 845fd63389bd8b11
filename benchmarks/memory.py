"""Worker memory is bounded by `fit.chunk_mb`, not by tensor or model size.

    python -m benchmarks.memory [--dir /tmp/lineage-bench]

Fits one suspect tensor against two candidates in a fresh process per case
and prints the peak RSS above the process's baseline (after imports and
planning; Linux's peak counter is reset through /proc/self/clear_refs), for
two tensor sizes and three chunk sizes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def child(root: str, chunk_mb: float) -> None:
    from lineage.align import align
    from lineage.engines import accumulate
    from lineage.options import FitOptions
    from lineage.reader import Reader
    from lineage.source import resolve

    r = Path(root)
    sus, cands = resolve("blend", str(r / "blend")), [resolve(n, str(r / n)) for n in ("base", "tune")]
    groups, _ = align(sus, cands)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = status_kb("VmRSS")
    with Reader() as rd:
        for g in groups:
            accumulate(g, rd, FitOptions(chunk_bytes=int(chunk_mb * (1 << 20))))
    peak = status_kb("VmHWM")
    print(json.dumps({"baseline_mb": base / 1024, "peak_mb": peak / 1024, "tensor_mb": groups[0].view.nbytes / 2**20}))


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/lineage-bench")
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], float(a.child[1]))
        return
    from benchmarks.synth import make_trio

    print(f"{'tensor':>10} {'chunk_mb':>8} {'peak-baseline MB':>17}")
    for rows in (8192, 32768):  # one BF16 tensor of 64 MiB, then 256 MiB, per model
        root = Path(a.dir) / f"mem-{rows}"
        make_trio(root, 1, rows, 4096)
        for chunk in (4, 16, 64):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", "--child", str(root), str(chunk)],
                capture_output=True,
                text=True,
                check=True,
            )
            d = json.loads(out.stdout)
            print(f"{d['tensor_mb']:>8.0f}MB {chunk:>8} {d['peak_mb'] - d['baseline_mb']:>17.0f}")


if __name__ == "__main__":
    main()
