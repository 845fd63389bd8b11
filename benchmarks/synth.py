"""Synthetic trios at realistic shapes for benchmarks: base, fine-tune, 0.57/0.43 blend, BF16."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def make_trio(root: Path, n_tensors: int, rows: int, cols: int, seed: int = 0) -> dict[str, Path]:
    """Three single-file models of `n_tensors` [rows, cols] BF16 matrices each."""
    g = torch.Generator().manual_seed(seed)
    out = {k: root / k for k in ("base", "tune", "blend")}
    if all((p / "model.safetensors").exists() for p in out.values()):
        return out
    models: dict[str, dict[str, torch.Tensor]] = {k: {} for k in out}
    for i in range(n_tensors):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        base = torch.randn(rows, cols, generator=g) * 0.02
        tune = base + 0.001 * torch.randn(rows, cols, generator=g)
        models["base"][name] = base.to(torch.bfloat16)
        models["tune"][name] = tune.to(torch.bfloat16)
        models["blend"][name] = (0.57 * tune + 0.43 * base).to(torch.bfloat16)
    for k, p in out.items():
        p.mkdir(parents=True, exist_ok=True)
        save_file(models[k], str(p / "model.safetensors"))
    return out
