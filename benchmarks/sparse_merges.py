"""Sparse merges over densities, weights and methods: does lineage name them, and their recipe?

mergekit's sparse methods (generalized task arithmetic in its registry) are
written out here in torch, as it defines them, so that a sweep needs no
mergekit run per case: DARE (each delta kept at random with probability
`density`, rescaled by 1 / density), TIES and breadcrumbs (each delta keeps its
`density` largest elements below its `gamma` largest), DELLA (kept at random
with a probability rising with the delta's magnitude rank in its row, from
density - epsilon to density + epsilon, then rescaled to the delta's L1
norm), each with or without TIES' sign election and with or without
normalising by the weights kept, as the mergekit method sets them. The real
mergekit merges of each method are in benchmarks/evalset.py and
tests/test_certify.py.

    python -m benchmarks.sparse_merges [--only NAME]

builds a base and two fine-tune-like children (the base plus 5% noise), and
for densities 0.2, 0.5 and 0.8 and weights 0.7 / 0.3, 0.5 / 0.5 and 1 / 1
audits each method's merge, and prints per case the verdict, the family, the
recipe's merge_method, weights and density, and whether the verdict is a
blend whose recipe names the method and a density within 0.05; then the
largest error of a recipe weight.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks.evalset import init_llama, save
from lineage.audit import run_local
from lineage.modelset import ModelSet


def dare(base: dict, tunes: list[dict], weights: list[float], density: float, elect: bool, seed: int) -> dict:
    """DARE as its paper and mergekit define it: each delta kept at random with probability
    `density` and rescaled by 1 / density; with `elect`, only the deltas whose sign agrees with
    their weighted sum's are added (TIES' election, as dare_ties)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, b in base.items():
        d = torch.stack([w * (t[k] - b) * (torch.rand(b.shape, generator=g) < density) / density for t, w in zip(tunes, weights)])
        if elect:
            d = d * (torch.sign(d) == torch.where(d.sum(0) >= 0, 1.0, -1.0))
        out[k] = (b + d.sum(0)).to(torch.bfloat16)
    return out


def trimmed(
    base: dict, tunes: list[dict], weights: list[float], density: float, gamma: float, elect: bool, normalize: bool
) -> dict:
    """mergekit's generalized task arithmetic with magnitude drops, written out: each delta keeps
    its `density` largest elements below its `gamma` largest (ties: gamma 0; breadcrumbs), weighted;
    with `elect`, only those agreeing in sign with the sum; with `normalize`, divided by the
    weights of the deltas kept."""
    out = {}
    for k, b in base.items():
        ds = []
        for t, w in zip(tunes, weights):
            d = (t[k] - b).flatten()
            n, top = int(density * d.numel()), int(gamma * d.numel())
            order = d.abs().argsort(descending=True)
            keep = torch.zeros_like(d)
            keep[order[top : top + n]] = 1
            ds.append((w * d * keep, w * keep))
        d, w = torch.stack([x for x, _ in ds]), torch.stack([y for _, y in ds])
        if elect:
            agree = (torch.sign(d) == torch.sign(d.sum(0))).float()
            d, w = d * agree, w * agree
        total = d.sum(0) / w.sum(0).clamp(min=1e-12) if normalize else d.sum(0)
        out[k] = (b + total.reshape(b.shape)).to(torch.bfloat16)
    return out


def della(
    base: dict, tunes: list[dict], weights: list[float], density: float, epsilon: float, elect: bool, normalize: bool, seed: int
) -> dict:
    """DELLA as mergekit's della_magprune: each delta kept with a probability rising linearly with
    its magnitude rank in its row from density - epsilon to density + epsilon, rescaled so its L1
    norm is the whole delta's, weighted; with `elect` and `normalize` as in `trimmed`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, b in base.items():
        ds, ws = [], []
        for t, w in zip(tunes, weights):
            d = t[k] - b
            rows = d if d.dim() > 1 else d.unsqueeze(0)
            ranks = rows.abs().argsort(1).argsort(1).float()
            lo, hi = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
            probs = (density - epsilon) + (ranks - lo) / (hi - lo).clamp(min=1) * 2 * epsilon
            keep = (torch.rand(rows.shape, generator=g) < probs).float().reshape(d.shape)
            kept = d * keep
            ds.append(w * kept * d.abs().sum() / kept.abs().sum().clamp(min=1e-12))
            ws.append(w * keep)
        d, w = torch.stack(ds), torch.stack(ws)
        if elect:
            agree = (torch.sign(d) == torch.sign(d.sum(0))).float()
            d, w = d * agree, w * agree
        total = d.sum(0) / w.sum(0).clamp(min=1e-12) if normalize else d.sum(0)
        out[k] = (b + total).to(torch.bfloat16)
    return out


#: method -> how to make it: (kind, elect, normalize, gamma), as mergekit's registry sets them
METHODS = {
    "dare_ties": ("dare", True, False, 0.0),
    "dare_linear": ("dare", False, False, 0.0),
    "ties": ("trim", True, True, 0.0),
    "breadcrumbs": ("trim", False, False, 0.01),
    "breadcrumbs_ties": ("trim", True, False, 0.01),
    "della": ("della", True, True, 0.0),
    "della_linear": ("della", False, False, 0.0),
}


def make(method: str, base: dict, tunes: list[dict], weights: list[float], density: float) -> dict:
    kind, elect, normalize, gamma = METHODS[method]
    if kind == "dare":
        return dare(base, tunes, weights, density, elect, seed=3)
    if kind == "trim":
        return trimmed(base, tunes, weights, density, gamma, elect, normalize)
    return della(base, tunes, weights, density, 0.1, elect, normalize, seed=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lineage-sparse-"))
    try:
        base = init_llama(0)
        g = torch.Generator().manual_seed(1)
        tunes = [{k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
        paths = {"base": save(root / "base", base), "ft1": save(root / "ft1", tunes[0]), "ft2": save(root / "ft2", tunes[1])}
        right = total = 0
        worst = 0.0
        for density in (0.2, 0.5, 0.8):
            for weights in ((0.7, 0.3), (0.5, 0.5), (1.0, 1.0)):
                for method in METHODS:
                    name = f"{method} density {density} weights {weights[0]}/{weights[1]}"
                    if a.only not in name:
                        continue
                    suspect = save(root / "suspect", make(method, base, tunes, list(weights), density))
                    ms = ModelSet.from_dict(
                        {
                            "name": "sweep",
                            "suspects": [{"name": "suspect", "source": str(suspect)}],
                            "candidates": [{"name": n, "source": str(p), "base": n == "base"} for n, p in paths.items()],
                        }
                    )
                    out = root / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    (v,) = run_local(ms, out)
                    rec = yaml.safe_load((out / v["recipe"]).read_text()) if v.get("recipe") else {}
                    params = [m.get("parameters", {}) for m in rec.get("models", [])]
                    dens = [p.get("density") for p in params]
                    ok = (
                        v["verdict"] == "blend"
                        and rec.get("merge_method") == method
                        and bool(dens)
                        and all(d is not None and abs(d - density) <= 0.05 for d in dens)
                    )
                    want = [w / sum(weights) if METHODS[method][2] else w for w in weights]  # normalised: shares
                    got = [p.get("weight") for p in params]
                    if ok and len(got) == 2 and None not in got:
                        worst = max(worst, *(abs(g - w) for g, w in zip(got, want)))
                    right, total = right + ok, total + 1
                    print(
                        f"{'ok   ' if ok else 'WRONG'} {name:42s} {v['verdict']}/{v.get('merge_family')} "
                        f"recipe {rec.get('merge_method')} weights {[p.get('weight') for p in params]} density {dens}"
                        + (f" {rec['parameters']}" if rec.get("parameters") else ""),
                        flush=True,
                    )
        print(f"{right} of {total} right (a blend, the method named, density within 0.05)")
        print(f"largest recipe weight error (shares where the method normalises): {worst:.4f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
