"""The demo trio, built once and deterministically: qwen-mini, nex-mini, rio-mini.

A miniature of the real case. `qwen-mini` is an MoE-shaped decoder stored
like Qwen3.5's BF16 release (fused experts, `model.language_model.` names).
`nex-mini` is a derivative of it, changed by structured updates (a low-rank
update plus a smaller dense one on every matrix, rescaled norms, 40 added
vocabulary rows), stored like an FP8 release: one tensor per expert in
F8_E4M3 with 128x128 block scales (F32, BF16 for `down_proj`), `model.`
names, two shards, one scale living in the other shard. `rio-mini` is
0.57 x nex-mini + 0.43 x qwen-mini, computed from the weights as the two
files store them and saved in BF16 with fused experts, as Rio was.

Sizes are chosen so that FP8 blocks are cropped (192 is not a multiple of
128) and so the whole trio builds in a few seconds on two cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # building the demo imports torch; reading the model set does not
    import torch

VERSION = "v1"
NAMES = ("qwen-mini", "nex-mini", "rio-mini")
ALPHA_NEX = 0.57
HIDDEN, INTER, EXPERTS, LAYERS, VOCAB, KV = 256, 192, 8, 4, 1000, 64
SENTINEL = "COMPLETE"


def default_cache() -> Path:
    return Path(os.path.expanduser("~/.cache/lineage"))


def ensure(cache: Path | None = None, say=None) -> Path:
    """The folder holding the three demo models, building it on first use.

    Built in a temporary folder beside the target and renamed into place,
    with a sentinel written last, so a killed build never looks complete and
    two concurrent first runs cannot interleave.
    """
    root = (cache or default_cache()) / f"demo-{VERSION}"
    if (root / SENTINEL).exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    if say is not None:
        say(f"building the demo models in {root} (once; a few seconds)")
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    try:
        build(tmp)
        (tmp / SENTINEL).write_text(VERSION)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            if not (root / SENTINEL).exists():
                shutil.rmtree(root, ignore_errors=True)
                os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


SCHEME = "demo://"


def materialize(model_set: dict, cache: Path | None = None, say=None) -> dict:
    """The model set with every `demo://NAME` source replaced by its built folder."""
    members = [m for role in ("suspects", "candidates") for m in model_set.get(role) or [] if isinstance(m, dict)]
    if not any(str(m.get("source", "")).startswith(SCHEME) for m in members):
        return model_set
    root = ensure(cache, say)
    out = dict(model_set)
    for role in ("suspects", "candidates"):
        out[role] = [
            {**m, "source": str(root / m["source"][len(SCHEME) :])}
            if isinstance(m, dict) and str(m.get("source", "")).startswith(SCHEME)
            else m
            for m in model_set.get(role) or []
        ]
    return out


def qwen_weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Canonical float32 weights (fused experts), trained-looking norms near 1."""
    import torch

    def mat(*shape: int) -> torch.Tensor:
        fan_in = shape[-1]
        return torch.randn(*shape, generator=gen) / math.sqrt(fan_in)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    w = {"embed_tokens.weight": mat(VOCAB, HIDDEN) * 0.5}
    for i in range(LAYERS):
        p = f"layers.{i}."
        w |= {
            p + "input_layernorm.weight": norm(HIDDEN),
            p + "post_attention_layernorm.weight": norm(HIDDEN),
            p + "self_attn.q_proj.weight": mat(HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": mat(KV, HIDDEN),
            p + "self_attn.v_proj.weight": mat(KV, HIDDEN),
            p + "self_attn.o_proj.weight": mat(HIDDEN, HIDDEN),
            p + "self_attn.q_norm.weight": norm(KV),
            p + "mlp.gate.weight": mat(EXPERTS, HIDDEN),
            p + "mlp.experts.gate_up_proj": mat(EXPERTS, 2 * INTER, HIDDEN),
            p + "mlp.experts.down_proj": mat(EXPERTS, HIDDEN, INTER),
            p + "mlp.shared_expert.gate_proj.weight": mat(INTER, HIDDEN),
            p + "mlp.shared_expert.up_proj.weight": mat(INTER, HIDDEN),
            p + "mlp.shared_expert.down_proj.weight": mat(HIDDEN, INTER),
        }
    w |= {"norm.weight": norm(HIDDEN), "lm_head.weight": mat(VOCAB, HIDDEN)}
    return w


def derive(base: dict[str, torch.Tensor], gen: torch.Generator, extra_vocab: int = 40) -> dict[str, torch.Tensor]:
    """A fine-tune-like derivative: low-rank plus dense updates, rescaled norms."""
    import torch

    out = {}
    for k, w in base.items():
        if w.ndim == 1:
            out[k] = w * (1 + 0.02 * torch.randn(w.shape, generator=gen))
            continue
        m = w.reshape(-1, w.shape[-1])
        u = torch.randn(m.shape[0], 8, generator=gen)
        v = torch.randn(8, m.shape[1], generator=gen)
        low = u @ v
        dense = torch.randn(m.shape, generator=gen)
        delta = 0.05 * low / low.norm() * m.norm() + 0.01 * dense / dense.norm() * m.norm()
        out[k] = (m + delta).reshape(w.shape)
    for k in ("embed_tokens.weight", "lm_head.weight"):
        new = torch.randn(extra_vocab, HIDDEN, generator=gen) * out[k].std()
        out[k] = torch.cat([out[k], new])
    return out


def fp8_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled F8_E4M3: (values, scale_inv) with w ~= values * scale_inv."""
    import torch

    r, c = w.shape
    br, bc = math.ceil(r / block), math.ceil(c / block)
    padded = torch.zeros(br * block, bc * block)
    padded[:r, :c] = w
    blocks = padded.reshape(br, block, bc, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(br * block, bc * block)[:r, :c]
    return q.to(torch.float8_e4m3fn), scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    r, c = q.shape
    full = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:r, :c]
    return q.float() * full


def split_experts(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused expert tensors -> one gate/up/down matrix per expert."""
    out = {}
    for k, v in w.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            for j in range(v.shape[0]):
                out[f"{pre}{j}.gate_proj.weight"] = v[j, :INTER]
                out[f"{pre}{j}.up_proj.weight"] = v[j, INTER:]
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for j in range(v.shape[0]):
                out[f"{pre}{j}.down_proj.weight"] = v[j]
        else:
            out[k] = v
    return out


def fuse_experts(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert matrices -> fused gate_up_proj / down_proj (inverse of split)."""
    import torch

    out = {k: v for k, v in w.items() if ".mlp.experts." not in k}
    for i in range(LAYERS):
        pre = f"layers.{i}.mlp.experts."
        out[pre + "gate_up_proj"] = torch.stack(
            [torch.cat([w[f"{pre}{j}.gate_proj.weight"], w[f"{pre}{j}.up_proj.weight"]]) for j in range(EXPERTS)]
        )
        out[pre + "down_proj"] = torch.stack([w[f"{pre}{j}.down_proj.weight"] for j in range(EXPERTS)])
    return out


def _fp8_eligible(name: str, w: torch.Tensor) -> bool:
    return w.ndim == 2 and ("self_attn" in name or "expert" in name) and "norm" not in name


def build(root: Path) -> None:
    """Write the three models under `root`."""
    import torch

    gen = torch.Generator().manual_seed(20260357)
    qwen = qwen_weights(gen)
    qwen_bf16 = {k: v.to(torch.bfloat16) for k, v in qwen.items()}
    save(root / "qwen-mini", {f"model.language_model.{k}": v for k, v in qwen_bf16.items()})

    nex_true = split_experts(derive({k: v.float() for k, v in qwen_bf16.items()}, gen))
    nex_file: dict[str, torch.Tensor] = {}
    nex_values: dict[str, torch.Tensor] = {}  # what the file holds, dequantized
    for k, v in nex_true.items():
        if _fp8_eligible(k, v):
            q, scale = fp8_quantize(v)
            scale = scale.to(torch.bfloat16) if k.endswith("down_proj.weight") else scale
            nex_file[f"model.{k}"], nex_file[f"model.{k}_scale_inv"] = q, scale
            nex_values[k] = fp8_dequantize(q, scale)
        else:
            nex_file[f"model.{k}"] = v.to(torch.bfloat16)
            nex_values[k] = nex_file[f"model.{k}"].float()
    save_sharded(root / "nex-mini", nex_file, move_scale="model.layers.0.self_attn.q_proj.weight_scale_inv")

    nex_fused = fuse_experts(nex_values)
    rio = {}
    for k, qv in qwen_bf16.items():
        nv = nex_fused[k][: qv.shape[0]] if k in ("embed_tokens.weight", "lm_head.weight") else nex_fused[k]
        rio[f"model.language_model.{k}"] = (ALPHA_NEX * nv + (1 - ALPHA_NEX) * qv.float()).to(torch.bfloat16)
    save(root / "rio-mini", rio)


def save(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(folder / "model.safetensors"))


def save_sharded(folder: Path, tensors: dict[str, torch.Tensor], move_scale: str | None = None) -> None:
    """Two shards and an index; `move_scale` goes to the shard its weight is not in."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    if move_scale:
        weight = move_scale[: -len("_scale_inv")]
        home = next(s for s, ns in shards.items() if weight in ns)
        other = next(s for s in shards if s != home)
        for s in shards:
            shards[s] = [n for n in shards[s] if n != move_scale]
        shards[other].append(move_scale)
    weight_map = {}
    for shard, ns in shards.items():
        save_file({n: tensors[n].contiguous() for n in sorted(ns)}, str(folder / shard))
        weight_map |= {n: shard for n in ns}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
