"""A Llama forward pass in plain torch, to train the evaluation set's models for real.

The evaluation set needs models that are trained (so their weights carry
the structure real checkpoints have, norms near 1 included) and fine-tunes
made by real optimiser steps on real text, without downloading anything.
The text is Python's own standard library source, read from this
interpreter's installation and split by file name into disjoint corpora;
tokens are bytes. The model is the Llama architecture over the state dict
`benchmarks.evalset.llama` builds (RMSNorm, grouped-query causal attention
without rotary embeddings, SwiGLU MLP, untied head).
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

CORPORA = {"pretrain": "abcdefgh", "ft-a": "ijklmn", "ft-b": "opqrs", "ft-c": "tuvwxyz"}


@cache
def corpus(name: str, limit: int = 2_000_000) -> torch.Tensor:
    """Bytes of the stdlib modules whose file names start with CORPORA[name]'s letters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.name[0].lower() in CORPORA[name])
    data = b"".join(p.read_bytes() for p in files)[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def forward(w: dict[str, torch.Tensor], tokens: torch.Tensor, layers: int, heads: int, kv_heads: int) -> torch.Tensor:
    x = w["model.embed_tokens.weight"][tokens]
    b, t, h = x.shape
    hd = h // heads
    for i in range(layers):
        p = f"model.layers.{i}."
        y = _rms(x, w[p + "input_layernorm.weight"])
        q = (y @ w[p + "self_attn.q_proj.weight"].T).view(b, t, heads, hd).transpose(1, 2)
        k = (y @ w[p + "self_attn.k_proj.weight"].T).view(b, t, kv_heads, hd).transpose(1, 2)
        v = (y @ w[p + "self_attn.v_proj.weight"].T).view(b, t, kv_heads, hd).transpose(1, 2)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        y = _rms(x, w[p + "post_attention_layernorm.weight"])
        x = (
            x
            + (F.silu(y @ w[p + "mlp.gate_proj.weight"].T) * (y @ w[p + "mlp.up_proj.weight"].T))
            @ w[p + "mlp.down_proj.weight"].T
        )
    return _rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def train(
    w: dict[str, torch.Tensor],
    text: torch.Tensor,
    steps: int,
    lr: float,
    seed: int,
    cfg: dict,
    batch: int = 8,
    ctx: int = 64,
    trainable: Callable[[str], bool] | None = None,
    lora: int = 0,
) -> dict[str, torch.Tensor]:
    """`steps` AdamW steps of next-byte prediction on random windows of `text`.

    `trainable` freezes the tensors it refuses (a fine-tune of the last
    layers only). `lora` > 0 trains rank-`lora` adapters (B A, B zero at the
    start, scaled by 2: alpha = 2 r) on every matrix of the stack instead of
    the weights, and returns the weights with the adapters merged in, as
    `merge_and_unload` does.

    On one thread: torch's multi-threaded CPU kernels add in an order that
    varies from run to run (1e-5 apart after 60 steps), and the evaluation
    set must be the same models every time it is built (tests compare its
    verdicts with stored ones). It costs about 5% here.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(w, text, steps, lr, seed, cfg, batch, ctx, trainable, lora)
    finally:
        torch.set_num_threads(threads)


def _train(
    w: dict[str, torch.Tensor],
    text: torch.Tensor,
    steps: int,
    lr: float,
    seed: int,
    cfg: dict,
    batch: int,
    ctx: int,
    trainable: Callable[[str], bool] | None,
    lora: int,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    train_it = trainable or (lambda k: True)
    params = {k: v.detach().clone().float().requires_grad_(train_it(k) and not lora) for k, v in w.items()}
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if lora:
        for k, v in params.items():
            if ".layers." in k and v.ndim == 2 and train_it(k):
                a = (torch.randn(lora, v.shape[1], generator=g) / math.sqrt(v.shape[1])).requires_grad_(True)
                adapters[k] = (torch.zeros(v.shape[0], lora, requires_grad=True), a)
    trained = [v for v in params.values() if v.requires_grad] + [t for ba in adapters.values() for t in ba]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)

    def weights() -> dict[str, torch.Tensor]:
        return {k: v + 2.0 * adapters[k][0] @ adapters[k][1] if k in adapters else v for k, v in params.items()}

    for _ in range(steps):
        starts = torch.randint(0, len(text) - ctx - 1, (batch,), generator=g)
        x = torch.stack([text[s : s + ctx] for s in starts])
        y = torch.stack([text[s + 1 : s + ctx + 1] for s in starts])
        logits = forward(weights(), x, cfg["layers"], cfg["heads"], cfg["kv"])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {k: v.detach() for k, v in weights().items()}


def loss(w: dict[str, torch.Tensor], text: torch.Tensor, cfg: dict, seed: int = 0, batch: int = 16, ctx: int = 64) -> float:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - ctx - 1, (batch,), generator=g)
    x = torch.stack([text[s : s + ctx] for s in starts])
    y = torch.stack([text[s + 1 : s + ctx + 1] for s in starts])
    with torch.no_grad():
        logits = forward(w, x, cfg["layers"], cfg["heads"], cfg["kv"])
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
