"""Cost of undoing a disguised residual stream, relative to the fit (issue 15).

    python -m benchmarks.gauge_cost [--hidden 512] [--layers 8]

Builds a Llama-shaped model (random init, float32), a copy of it with the
hidden dimension permuted and one with the residual stream rotated (norm
gains folded, random new gains), and audits each against the original with
`run_local`: the plain copy costs the fit alone; the disguised ones add the
gauge estimate (a sample of embedding rows) and the refit in the
suspect's gauge, and the last (every disguise of benchmarks/attacks.py at
once) the invariant products of every layer. With `--moe`, a Qwen3-MoE model
(transformers' initialisation, 16 experts per layer) with its experts
renumbered (the router matching, then the experts compared again), units
permuted inside every expert, and rotated and renumbered at once. Prints
seconds and the ratio to the plain audit, measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks import attacks
from benchmarks.evalset import init_llama, save
from lineage.audit import run_local
from lineage.modelset import ModelSet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--moe", action="store_true", help="a Qwen3-MoE model (16 experts) and its MoE disguises instead")
    a = ap.parse_args()
    cfg = {"hidden": a.hidden, "inter": a.hidden * 11 // 4, "layers": a.layers, "heads": 8, "kv": 4, "vocab": 16000}
    if a.moe:
        from benchmarks import moe

        cfg = moe.MOE | {"hidden": a.hidden, "inter": a.hidden, "layers": a.layers, "experts": 16, "vocab": 16000, "head_dim": 64}
        base = moe.train(None, "pretrain", steps=0, lr=0.0, seed=0, cfg=cfg)  # transformers' own initialisation

        def store(folder: Path, w: dict) -> Path:
            return moe.save(folder, w, cfg)

        suspects = {
            "plain copy": base,
            "unrelated model": moe.train(None, "pretrain", steps=0, lr=0.0, seed=1, cfg=cfg),
            "experts renumbered": moe.permute_experts(base, 1),
            "expert units permuted": moe.permute_expert_units(base, 2),
            "rotated, renumbered": moe.permute_experts(moe.rotate_residual(base, 3), 4),
        }
    else:
        base = init_llama(0, cfg)

        def store(folder: Path, w: dict) -> Path:
            return save(folder, w, shape=cfg)

        suspects = {
            "plain copy": base,
            "unrelated model": init_llama(1, cfg),
            "hidden permuted": attacks.permute_hidden(base, 1),
            "residual rotated": attacks.rotate_residual(base, 2, new_gains=True),
            "every disguise": attacks.everything(base, 3, cfg["heads"], cfg["kv"]),
        }
    mb = sum(v.numel() * 4 for v in base.values()) / 1e6
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        p = store(root / "base", base)
        times = {}
        # the plain copy once more first, unreported: the first audit of a process pays its imports
        for name, w in [("warm-up", base), *suspects.items()]:
            s = store(root / name.replace(" ", "-").replace(",", ""), w)
            ms = ModelSet.from_dict(
                {
                    "name": "cost",
                    "suspects": [{"name": "s", "source": str(s)}],
                    "candidates": [{"name": "base", "source": str(p)}],
                }
            )
            t0 = time.perf_counter()
            (v,) = run_local(ms, root / ("out-" + name.replace(" ", "-")))
            times[name] = time.perf_counter() - t0
            if name == "warm-up":
                continue
            print(
                f"{name:18s} {v['verdict']:10s} {times[name]:6.2f} s  ({times[name] / times['plain copy']:.2f}x the plain audit)  undone {v.get('undone')}"
            )
    print(f"model: {mb:.0f} MB float32, hidden {a.hidden}, {a.layers} layers" + (", 16 experts per layer" if a.moe else ""))


if __name__ == "__main__":
    main()
