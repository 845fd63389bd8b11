"""A bulk audit against separate audits: bytes read, wall time, peak memory, verdicts.

    python -m benchmarks.bulk [--dir /tmp/lineage-bulk] [--mb 96]

Builds a pool of 6 candidates (two families of a base and a fine-tune, two
unrelated models) and 16 suspects: copies, fine-tunes, fine-tunes of
fine-tunes, blends, re-uploads of other suspects and unrelated models, each
about --mb MB of BF16. Then audits them with `python -m jobs.audit` on an
embedded Ray, once as one job (16 suspects) and once as 16 separate jobs,
and prints the bytes each read (from audit.json), the wall time, the peak
memory of the driver and its Ray processes, and whether every verdict,
parent and weight is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent


def models(root: Path, mb: int) -> tuple[dict[str, Path], dict[str, Path]]:
    """(suspects, pool): 16 and 6 folders of one safetensors file each."""
    if (root / "COMPLETE").exists():
        read = json.loads((root / "COMPLETE").read_text())
        return {k: Path(v) for k, v in read["suspects"].items()}, {k: Path(v) for k, v in read["pool"].items()}
    rows = max(256, (mb << 20) // (2 * 1024 * 8))  # 8 matrices of rows x 1024 BF16

    def model(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {
            f"model.layers.{i // 2}.mlp.{('up', 'down')[i % 2]}_proj.weight": torch.randn(rows, 1024, generator=g) * 0.02
            for i in range(8)
        }

    def tune(w: dict, seed: int, scale: float = 0.1) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {k: v + scale * v.std() * torch.randn(v.shape, generator=g) for k, v in w.items()}

    def mix(a: dict, b: dict, x: float) -> dict:
        return {k: x * a[k] + (1 - x) * b[k] for k in a}

    A, B, C, D = model(1), model(2), model(3), model(4)
    fa, fb = tune(A, 10), tune(B, 11)
    pool = {"A": A, "A-ft": fa, "B": B, "B-ft": fb, "C": C, "D": D}
    s = {
        "copy-A": A,
        "copy-B": B,
        "ft-A-1": tune(A, 20),
        "ft-A-2": tune(A, 21),
        "ft-A-3": tune(A, 22, 0.3),
        "ft-Aft-1": tune(fa, 23, 0.05),
        "ft-Aft-2": tune(fa, 24, 0.05),
        "blend-AB": mix(A, B, 0.6),
        "blend-BA": mix(A, B, 0.3),
        "blend-fts": mix(fa, fb, 0.5),
        "stranger-1": model(30),
        "stranger-2": model(31),
        "stranger-3": model(32),
    }
    s["reupload-1"] = s["ft-A-1"]
    s["reupload-2"] = s["blend-AB"]
    s["further-1"] = tune(s["ft-A-2"], 25, 0.05)
    out: dict[str, dict[str, Path]] = {"suspects": {}, "pool": {}}
    for role, group in (("pool", pool), ("suspects", s)):
        for name, w in group.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            save_file({k: v.to(torch.bfloat16).contiguous() for k, v in w.items()}, str(root / name / "model.safetensors"))
            out[role][name] = root / name
    (root / "COMPLETE").write_text(json.dumps({r: {k: str(v) for k, v in d.items()} for r, d in out.items()}))
    return out["suspects"], out["pool"]


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(open(f"/proc/{p}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            todo += [int(c) for t in os.listdir(f"/proc/{p}/task") for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except OSError:
            pass
    return total


def audit(conf: Path, name: str, out: Path) -> tuple[float, int, dict]:
    """One `python -m jobs.audit` run: (seconds, peak tree RSS, audit.json's last run)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    t = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "jobs.audit", "--config-dir", str(conf), f"model_set={name}", f"output_dir={out}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0]

    def watch() -> None:
        while p.poll() is None:
            peak[0] = max(peak[0], tree_rss(p.pid))
            time.sleep(0.1)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    _, err = p.communicate()
    w.join()
    if p.returncode != 0:
        raise SystemExit(f"audit {name} failed: {err[-2000:]}")
    return time.perf_counter() - t, peak[0], json.loads((out / "audit.json").read_text())["runs"][-1]


def model_set(name: str, suspects: dict[str, Path], pool: dict[str, Path]) -> str:
    lines = [f"name: {name}", "suspects:"] + [f"  - {{name: {n}, source: {p}}}" for n, p in suspects.items()]
    lines += ["candidates:"] + [f"  - {{name: {n}, source: {p}}}" for n, p in pool.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/lineage-bulk")
    ap.add_argument("--mb", type=int, default=96, help="size of each model")
    a = ap.parse_args()
    root = Path(a.dir)
    suspects, pool = models(root / "models", a.mb)
    data = sum(f.stat().st_size for p in [*suspects.values(), *pool.values()] for f in p.glob("*.safetensors"))
    print(f"== {len(suspects)} suspects against a pool of {len(pool)}, {data / 1e9:.2f} GB of models ==")
    conf = root / "conf" / "model_set"
    shutil.rmtree(root / "conf", ignore_errors=True)
    conf.mkdir(parents=True)
    (conf / "bulk.yaml").write_text(model_set("bulk", suspects, pool))
    for n, p in suspects.items():
        (conf / f"one-{n}.yaml").write_text(model_set(f"one-{n}", {n: p}, pool))
    shutil.rmtree(root / "out", ignore_errors=True)
    secs, peak, run = audit(root / "conf", "bulk", root / "out" / "bulk")
    one = {"secs": secs, "peak": peak, "bytes": run["bytes_screening"] + run["bytes_fit"]}
    many = {"secs": 0.0, "peak": 0, "bytes": 0}
    for n in suspects:
        s, pk, r = audit(root / "conf", f"one-{n}", root / "out" / n)
        many["secs"] += s
        many["peak"] = max(many["peak"], pk)
        many["bytes"] += r["bytes_screening"] + r["bytes_fit"]
    for what, m in (("one job", one), (f"{len(suspects)} separate jobs", many)):
        print(
            f"{what:<18} read {m['bytes'] / 1e9:6.2f} GB ({m['bytes'] / data:4.2f}x the models)  "
            f"{m['secs']:6.1f} s  peak RSS {m['peak'] / 1e6:6.0f} MB (driver and Ray)"
        )
    bulk = {v["suspect"]: v for v in (json.loads(f.read_text()) for f in (root / "out" / "bulk" / "verdicts").glob("*.json"))}
    same = 0
    for n in suspects:
        v = json.loads((root / "out" / n / "verdicts" / f"{n}.json").read_text())
        b = bulk[n]
        key = lambda d: (d["verdict"], d.get("method"), [(p["name"], round(p["weight"], 6)) for p in d["parents"]])  # noqa: E731
        ok = key(v) == key(b)
        same += ok
        rel = ", ".join(f"{r['suspect']} ({r['kind']})" for r in b.get("relations", []))
        parents = " + ".join(f"{p['weight']:.3f} {p['name']}" for p in b["parents"])
        print(f"  {n:<11} {b['verdict']:<9} {parents:<32} {'same' if ok else 'DIFFERENT'}  relations: {rel or '-'}")
    print(
        f"verdicts, parents and weights identical in {same}/{len(suspects)}; ratios: bytes {many['bytes'] / one['bytes']:.1f}x, time {many['secs'] / one['secs']:.1f}x"
    )


if __name__ == "__main__":
    main()
