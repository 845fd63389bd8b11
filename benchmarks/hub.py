"""Hub sources: bytes fetched and wall time, against downloading the snapshots first.

    python -m benchmarks.hub [--dir /tmp/lineage-hub] [--nodes 16] [--gbps 10]

Part 1, measured: three BF16 repositories of about 400 MB each (a base, a
fine-tune, their 0.57/0.43 blend) served by the loopback hub of the tests
(tests/hubserver.py, the real huggingface_hub client). It audits the blend
over HTTP in full, at 10% and at 1% (lineage fetches headers on the driver
and byte ranges in the workers), and, as the baseline, `snapshot_download`
of the three repositories into an empty cache followed by the same audit of
the local files; bytes as counted by the server, wall time, and the verdict.

Part 2, estimated: the Rio audit (Rio 3.5 Open 397B in fused BF16 against
Qwen3.5-397B-A17B in fused BF16 and Nex-N2-Pro in per-expert FP8) planned
from ../shared/manifests at real scale: the bytes each node fetches, full
and at 1%, and the wall time at a stated per-node bandwidth, against
pulling the three snapshots through one machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
H = 4096


def build(root: Path) -> dict[str, Path]:
    """base / ft / mix of about 400 MB each: an embedding, two attention layers, an MLP."""
    if (root / "COMPLETE").exists():
        return {n: root / n for n in ("base", "ft", "mix")}
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (32768, H), "lm_head.weight": (8192, H)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (H, H),
            p + "self_attn.o_proj.weight": (H, H),
            p + "mlp.up_proj.weight": (4 * H, H),
        }
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    ft = {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    mix = {k: 0.57 * ft[k] + 0.43 * base[k] for k in base}
    for name, w in (("base", base), ("ft", ft), ("mix", mix)):
        (root / name).mkdir(parents=True, exist_ok=True)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in w.items()}, str(root / name / "model.safetensors"))
    (root / "COMPLETE").write_text("")
    return {n: root / n for n in ("base", "ft", "mix")}


def measured(root: Path) -> None:
    from lineage.audit import run_local
    from lineage.modelset import ModelSet
    from lineage.options import FitOptions
    from tests.hubserver import Hub, hub_env

    models = build(root / "models")
    data = sum(f.stat().st_size for p in models.values() for f in p.glob("*.safetensors"))
    print(f"== three repositories, {data / 1e9:.2f} GB in all, served on loopback ==")
    with Hub() as hub:
        for name, folder in models.items():
            hub.repo(f"bench/{name}").add_commit(folder)
        home = Path(tempfile.mkdtemp(prefix="hf-", dir=root))
        os.environ.update(hub_env(hub, home))
        import huggingface_hub.constants as c

        c.HF_HUB_CACHE = str(home / "hub")

        def ms(src: dict[str, str]) -> ModelSet:
            return ModelSet.from_dict(
                {
                    "name": "hub",
                    "suspects": [{"name": "mix", "source": src["mix"]}],
                    "candidates": [{"name": "base", "source": src["base"], "base": True}, {"name": "ft", "source": src["ft"]}],
                }
            )

        hf = {n: f"hf://bench/{n}" for n in models}
        rows = []
        for frac in (1.0, 0.1, 0.01):
            out = root / f"audit-{frac}"
            shutil.rmtree(out, ignore_errors=True)
            hub.reset_counts()
            t = time.perf_counter()
            (v,) = run_local(ms(hf), out, FitOptions(sample_fraction=frac))
            rows.append((f"range reads, {frac:.0%}", hub.total_sent, time.perf_counter() - t, v))
        from huggingface_hub import snapshot_download

        hub.reset_counts()
        t = time.perf_counter()
        local = {n: snapshot_download(f"bench/{n}", endpoint=hub.endpoint) for n in models}
        out = root / "audit-snapshot"
        shutil.rmtree(out, ignore_errors=True)
        (v,) = run_local(ms(local), out)
        rows.append(("snapshot_download + local audit", hub.total_sent, time.perf_counter() - t, v))
        shutil.rmtree(home, ignore_errors=True)
    base_t = rows[-1][2]
    for what, sent, secs, v in rows:
        w = ", ".join(f"{p['name']} {p['weight']:.4f}" for p in v["parents"])
        print(
            f"{what:<34} fetched {sent / 1e9:6.3f} GB ({sent / data:6.1%} of the data)  {secs:6.2f} s  ({base_t / secs:4.1f}x)  {v['verdict']} {w}"
        )


def estimated(manifests: Path, nodes: int, gbps: float, fit_gbs: float) -> None:
    from lineage.align import align
    from lineage.manifest import load_manifest
    from lineage.plan import plan_units
    from lineage.sampling import block_rows, sample_ranges

    rio = load_manifest("rio", manifests / "qwen3.5-397b-a17b-bf16.index.json.gz")
    qwen = load_manifest("qwen", manifests / "qwen3.5-397b-a17b-bf16.index.json.gz")
    nex = load_manifest("nex", manifests / "qwen3.5-397b-a17b-fp8.index.json.gz")
    groups, _ = align(rio, [qwen, nex])
    units = plan_units(groups, 1 << 62, min_units=nodes * 4, max_item_bytes=64 << 20)
    full = sum(u.nbytes for u in units)
    per_node = [0] * nodes
    for u in sorted(units, key=lambda u: -u.nbytes):  # the units go to whichever node is free
        per_node[per_node.index(min(per_node))] += u.nbytes
    sampled = 0
    for g in groups:
        if g.status != "ok" or g.view is None:
            continue
        rows = sum(b - a for a, b in sample_ranges(0, g.view.rows, block_rows(g.view.cols), 0.01, g.tensor))
        sampled += g.nbytes * rows // g.view.rows
    snapshots = rio.nbytes + qwen.nbytes + nex.nbytes
    bw = gbps / 8 * 1e9
    print(f"\n== the Rio audit at real scale (from manifests), {nodes} nodes at {gbps:g} Gbit/s each ==")
    print(f"three snapshots: {snapshots / 1e12:.2f} TB; the audit reads {full / 1e12:.2f} TB (every byte once)")
    print(
        f"full audit:   {max(per_node) / 1e9:7.1f} GB per node (most loaded), about {max(per_node) / min(bw, fit_gbs * 1e9) / 60:5.1f} min"
        f" (network {max(per_node) / bw / 60:.1f} min, fit at {fit_gbs:g} GB/s {max(per_node) / fit_gbs / 1e9 / 60:.1f} min)"
    )
    print(
        f"1% sampled:   {sampled / nodes / 1e9:7.1f} GB per node, about {sampled / nodes / bw:5.1f} s; {sampled / 1e9:.1f} GB in all"
    )
    print(
        f"snapshot_download through one machine at {gbps:g} Gbit/s: {snapshots / bw / 3600:5.1f} h before the first tensor is fitted"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/lineage-hub")
    ap.add_argument("--manifests", default=str(REPO.parent / "shared" / "manifests"))
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--gbps", type=float, default=10.0, help="network bandwidth per node, Gbit/s")
    ap.add_argument("--fit-gbs", type=float, default=2.0, help="fit throughput per node, GB/s (benchmarks.throughput)")
    a = ap.parse_args()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    measured(root)
    estimated(Path(a.manifests), a.nodes, a.gbps, a.fit_gbs)


if __name__ == "__main__":
    main()
