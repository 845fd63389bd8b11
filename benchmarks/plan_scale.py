"""Plan Qwen3.5-397B-A17B (fused BF16) against its FP8 per-expert layout, from manifests.

    python -m benchmarks.plan_scale [--manifests ../shared/manifests]

Prints load, align and pack times, unit imbalance at 64 and 512 workers,
and the driver's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from lineage.align import align
from lineage.manifest import load_manifest
from lineage.plan import imbalance, plan_units


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifests", default=str(Path(__file__).resolve().parents[2] / "shared" / "manifests"))
    ap.add_argument("--max-item-mb", type=float, default=64)
    a = ap.parse_args()
    m = Path(a.manifests)
    t0 = time.perf_counter()
    s = load_manifest("bf16", m / "qwen3.5-397b-a17b-bf16.index.json.gz")
    c = load_manifest("fp8", m / "qwen3.5-397b-a17b-fp8.index.json.gz")
    t1 = time.perf_counter()
    groups, unmatched = align(s, [c])
    t2 = time.perf_counter()
    ok = sum(g.status == "ok" for g in groups)
    print(
        f"load {t1 - t0:.1f}s ({len(s.tensors)} + {len(c.tensors)} tensors), align {t2 - t1:.1f}s: {ok}/{len(groups)} aligned, {len(unmatched['fp8'])} candidate tensors unused"
    )
    for workers in (64, 512):
        t = time.perf_counter()
        units = plan_units(groups, 1 << 62, min_units=workers, max_item_bytes=int(a.max_item_mb * (1 << 20)))
        items = sum(len(u.items) for u in units)
        print(
            f"{workers:>4} workers: pack {time.perf_counter() - t:.2f}s, {items} items, {sum(u.nbytes for u in units) / 1e12:.2f} TB, imbalance {imbalance(units):.2%}"
        )
    print(f"driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
