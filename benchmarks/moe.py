"""Mixture-of-experts models for the evaluation set, trained for real with transformers.

The case lineage exists for is a mixture of experts (Qwen3.5-397B-A17B),
so the evaluation set needs MoE suspects too: Qwen3-MoE-shaped models
(q/k norms, a router per layer, top-2 of 8 experts), built and trained by
transformers' own `Qwen3MoeForCausalLM` on the same byte corpora as
benchmarks/tinyllama.py, and saved by its `save_pretrained` (one tensor per
expert, the layout the hub serves). `fused` rewrites a state dict in the
fused layout (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])
that Qwen3.5's BF16 release uses, and `permute_experts` is the disguise an
MoE allows on top of the dense ones: experts renumbered, with the router's
rows, which leaves the function unchanged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from benchmarks.tinyllama import corpus

MOE = {"hidden": 128, "inter": 128, "layers": 4, "heads": 4, "kv": 2, "head_dim": 32, "experts": 8, "topk": 2, "vocab": 256}
#: Qwen3.5-397B-A17B's architecture in miniature: Gated DeltaNet linear attention in three layers of
#: four, gated full attention in the fourth, a shared expert beside the routed ones, and norms
#: that multiply by (1 + w) (stored near 0)
QWEN35 = MOE | {"arch": "qwen3_5_moe", "layer_types": ["linear_attention"] * 3 + ["full_attention"]}
EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def config(cfg: dict = MOE):
    from transformers import Qwen3MoeConfig

    if cfg.get("arch") == "qwen3_5_moe":
        from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

        return Qwen3_5MoeTextConfig(
            vocab_size=cfg["vocab"],
            hidden_size=cfg["hidden"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"],
            num_key_value_heads=cfg["kv"],
            head_dim=cfg["head_dim"],
            linear_key_head_dim=cfg["head_dim"],
            linear_value_head_dim=cfg["head_dim"],
            linear_num_key_heads=cfg["kv"],
            linear_num_value_heads=cfg["heads"],
            moe_intermediate_size=cfg["inter"],
            shared_expert_intermediate_size=cfg["inter"],
            num_experts=cfg["experts"],
            num_experts_per_tok=cfg["topk"],
            layer_types=cfg["layer_types"],
            tie_word_embeddings=False,
            max_position_embeddings=256,
        )
    return Qwen3MoeConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["inter"],
        moe_intermediate_size=cfg["inter"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv"],
        head_dim=cfg["head_dim"],
        num_experts=cfg["experts"],
        num_experts_per_tok=cfg["topk"],
        decoder_sparse_step=1,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    )


def _model(w: dict[str, torch.Tensor] | None, seed: int, cfg: dict):
    """A Qwen3MoeForCausalLM with weights `w` (per-expert names), or freshly initialised from `seed`."""
    import tempfile

    import transformers

    cls = transformers.Qwen3_5MoeForCausalLM if cfg.get("arch") == "qwen3_5_moe" else transformers.Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    if w is None:
        return cls(config(cfg)).float()
    with tempfile.TemporaryDirectory() as d:
        save(Path(d), w, cfg)
        return cls.from_pretrained(d, dtype=torch.float32)


def _weights(m, cfg: dict) -> dict[str, torch.Tensor]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        m.save_pretrained(d)
        return {k: v.float() for k, v in load_file(str(Path(d) / "model.safetensors")).items()}


def train(w: dict | None, text: str, steps: int, lr: float, seed: int, cfg: dict = MOE, batch: int = 8, ctx: int = 64):
    """`steps` AdamW steps of next-byte prediction on random windows of corpus `text`, on one
    thread so that the models are the same on every build (see tinyllama.train)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = _model(w, seed, cfg)
        m.train()
        data = corpus(text)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(steps):
            starts = torch.randint(0, len(data) - ctx - 1, (batch,), generator=g)
            x = torch.stack([data[s : s + ctx] for s in starts])
            y = torch.stack([data[s + 1 : s + ctx + 1] for s in starts])
            logits = m(input_ids=x).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return _weights(m, cfg)
    finally:
        torch.set_num_threads(threads)


def pretrained(seed: int, cfg: dict = MOE) -> dict[str, torch.Tensor]:
    """An MoE model trained from seed `seed`: 300 steps on the pretraining corpus."""
    return train(None, "pretrain", steps=300, lr=3e-3, seed=seed, cfg=cfg)


def finetune(w: dict, text: str, seed: int, steps: int = 30, lr: float = 1e-4, cfg: dict = MOE) -> dict:
    return train(w, text, steps=steps, lr=lr, seed=seed, cfg=cfg)


def save(folder: Path, w: dict[str, torch.Tensor], cfg: dict = MOE) -> Path:
    """The state dict as model.safetensors with transformers' config.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "model.safetensors"))
    c = config(cfg).to_dict()
    c["architectures"] = ["Qwen3_5MoeForCausalLM" if cfg.get("arch") == "qwen3_5_moe" else "Qwen3MoeForCausalLM"]
    (folder / "config.json").write_text(json.dumps(c))
    return folder


def logits(w: dict, cfg: dict = MOE, seed: int = 0) -> torch.Tensor:
    """The model's logits on a fixed window of held-out text: what a disguise must leave unchanged."""
    m = _model(w, 0, cfg if "model.layers.0.linear_attn.out_proj.weight" not in w else QWEN35).eval()
    data = corpus("ft-c")
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, len(data) - 65, (4,), generator=g)
    with torch.no_grad():
        return m(input_ids=torch.stack([data[i : i + 64] for i in s])).logits


def fused(w: dict) -> dict:
    """The same weights with each layer's experts fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    out, experts = {}, {}
    for k, v in w.items():
        m = EXPERT.match(k)
        if m is None:
            out[k] = v
        else:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = v
    for prefix, per in experts.items():
        order = sorted(per)
        out[prefix + ".gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]]) for e in order])
        out[prefix + ".down_proj"] = torch.stack([per[e]["down_proj"] for e in order])
    return out


def per_expert(w: dict) -> dict:
    """The inverse of `fused`: each fused expert tensor split into one matrix per expert."""
    out = {}
    for k, v in w.items():
        m = re.match(r"^(.+\.experts)\.(gate_up_proj|down_proj)$", k)
        if m is None or v.ndim != 3:
            out[k] = v
        elif m[2] == "down_proj":
            out |= {f"{m[1]}.{e}.down_proj.weight": v[e] for e in range(v.shape[0])}
        else:
            half = v.shape[1] // 2
            out |= {f"{m[1]}.{e}.gate_proj.weight": v[e, :half] for e in range(v.shape[0])}
            out |= {f"{m[1]}.{e}.up_proj.weight": v[e, half:] for e in range(v.shape[0])}
    return out


def permute_experts(w: dict, seed: int) -> dict:
    """Experts renumbered in every layer, the router's rows with them: the same function."""
    g = torch.Generator().manual_seed(seed)
    out = dict(w)
    layers = sorted({k.split(".mlp.")[0] for k in w if ".mlp.gate.weight" in k})
    for p in layers:
        router = w[p + ".mlp.gate.weight"]
        perm = torch.randperm(router.shape[0], generator=g)  # new expert e is old expert perm[e]
        out[p + ".mlp.gate.weight"] = router[perm].clone()
        for e, old in enumerate(perm.tolist()):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{p}.mlp.experts.{e}.{proj}.weight"] = w[f"{p}.mlp.experts.{old}.{proj}.weight"]
    return out


def _readers(w: dict, p: str) -> list[str]:
    """The matrices of layer prefix `p` that read the post-attention norm: router, experts' and
    shared expert's gate/up, the shared expert's gate."""
    mlp = [k for k in w if k.startswith(p + "mlp.")]
    return [k for k in mlp if k.endswith(("gate_proj.weight", "up_proj.weight", "mlp.gate.weight", "shared_expert_gate.weight"))]


def rotate_residual(w: dict, seed: int) -> dict:
    """Norm gains folded into their readers (attention or linear attention, router, experts,
    shared expert; a (1 + w) gain where the model's norms multiply by it), then the residual
    stream rotated by a random orthogonal matrix: the same function (benchmarks/attacks.py does
    the same to a dense model)."""
    from benchmarks.attacks import _orthogonal

    g = torch.Generator().manual_seed(seed)
    x = {k: v.double() for k, v in w.items()}
    offset = 1.0 if "model.layers.0.linear_attn.out_proj.weight" in w else 0.0  # Qwen3.5: (1 + w)
    h = x["model.embed_tokens.weight"].shape[1]
    q = _orthogonal(h, g)

    def fold(norm: str, readers: list[str]) -> None:
        for r in readers:
            x[r] = x[r] * (x[norm] + offset) @ q
        x[norm] = torch.full_like(x[norm], 1.0 - offset)

    layers = sorted({k.split(".mlp.")[0] + "." for k in w if ".mlp.gate.weight" in k})
    for p in layers:
        attn = [k for k in w if k.startswith(p) and re.search(r"(self_attn\.[qkv]_proj|linear_attn\.in_proj_\w+)\.weight$", k)]
        fold(p + "input_layernorm.weight", attn)
        fold(p + "post_attention_layernorm.weight", _readers(w, p))
        for k in [k for k in w if k.startswith(p) and re.search(r"(o_proj|out_proj|down_proj)\.weight$", k)]:
            x[k] = q.T @ x[k]
    fold("model.norm.weight", ["lm_head.weight"])
    x["model.embed_tokens.weight"] = x["model.embed_tokens.weight"] @ q
    return {k: v.to(w[k].dtype) for k, v in x.items()}


def _built(root: Path, name: str, make, cfg: dict) -> dict[str, torch.Tensor]:
    """A trained model, made once per folder (training is deterministic; `--keep` reuses them)."""
    f = root / name / "model.safetensors"
    if f.exists():
        return load_file(str(f))
    w = make()
    save(root / name, w, cfg)
    return w


def _checked(w: dict, before: dict, what: str, cfg: dict) -> dict:
    """`w`, once running it shows the disguise left the function of `before` unchanged."""
    ref = logits(before, cfg)
    err = float((logits(w, cfg) - ref).abs().max() / ref.abs().max())
    assert err < 1e-4, f"{what}: the disguise changed the function ({err:.1e})"
    return w


def cases(root: Path, add, mergekit) -> None:
    """The evaluation set's mixtures of experts (when transformers is installed): copies in both
    expert layouts, a fine-tune, blends (torch and mergekit), the MoE disguises (experts
    renumbered, the residual rotated, both, on a copy, a fine-tune and a blend, each checked
    function-preserving), and unrelated controls."""

    def built(name: str, make) -> dict[str, torch.Tensor]:
        return _built(root, name, make, MOE)

    def checked(w: dict, before: dict, what: str) -> dict:
        return _checked(w, before, what, MOE)

    def bf16(w: dict) -> dict:
        return {k: v.to(torch.bfloat16) for k, v in w.items()}

    base, other = built("moe-0", lambda: pretrained(0)), built("moe-1", lambda: pretrained(1))
    built("moe-2", lambda: pretrained(2))
    ft1 = built("moe-ft1", lambda: finetune(base, "ft-a", 11))
    ft2 = built("moe-ft2", lambda: finetune(base, "ft-b", 12))
    p = {n: root / n for n in ("moe-0", "moe-1", "moe-2", "moe-ft1", "moe-ft2")}
    one = {"base": p["moe-0"]}
    fam = {"base": p["moe-0"], "ft1": p["moe-ft1"], "ft2": p["moe-ft2"]}
    renum = ["experts renumbered"]
    add("moe bf16 copy", save(root / "moe-bf16", bf16(base)), one, "identical")
    add("moe fused experts, bf16", save(root / "moe-fused", bf16(fused(base))), one, "identical")
    add("moe fine-tune vs base", p["moe-ft1"], {"base": p["moe-0"], "seed1": p["moe-1"]}, "derived", parent="base")
    lin = {k: 0.6 * ft1[k] + 0.4 * ft2[k] for k in base}
    add("moe linear 0.6/0.4 (torch)", save(root / "moe-lin", bf16(lin)), fam, "blend", {"ft1": 0.6, "ft2": 0.4})
    mk = "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.7}}\ndtype: bfloat16\n"
    folder = mergekit(root / "moe-mk-linear", mk.format(a=p["moe-ft1"], b=p["moe-ft2"]))
    if folder is not None:
        add("mergekit moe linear 0.3/0.7", folder, fam, "blend", {"ft1": 0.3, "ft2": 0.7})
    ta = (
        "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.4}}\ndtype: bfloat16\n"
    )
    folder = mergekit(root / "moe-mk-ta", ta.format(base=p["moe-0"], a=p["moe-ft1"], b=p["moe-ft2"]))
    if folder is not None:
        add("mergekit moe task_arithmetic 0.6/0.4", folder, fam, "blend", {"ft1": 0.6, "ft2": 0.4}, base="base")
    add(
        "disguise: moe experts renumbered",
        save(root / "moe-atk-renum", checked(permute_experts(base, 61), base, "renumbered")),
        one,
        "identical",
        undone=renum,
    )
    add(
        "disguise: moe experts renumbered, fused",
        save(root / "moe-atk-renum-fused", fused(permute_experts(base, 62))),
        one,
        "identical",
        undone=renum,
    )
    add(
        "disguise: moe fine-tune, experts renumbered",
        save(root / "moe-atk-ft-renum", checked(permute_experts(ft1, 63), ft1, "fine-tune renumbered")),
        {"base": p["moe-0"], "seed1": p["moe-1"]},
        "derived",
        parent="base",
        undone=renum,
    )
    add(
        "disguise: moe 0.6/0.4 blend, experts renumbered",
        save(root / "moe-atk-lin-renum", bf16(permute_experts(lin, 64))),
        fam,
        "blend",
        {"ft1": 0.6, "ft2": 0.4},
        undone=renum,
    )
    add(
        "disguise: moe router rows shifted, experts renumbered",
        save(root / "moe-atk-shift-renum", checked(permute_experts(shift_router(base, 72), 73), base, "router shifted")),
        one,
        "identical",
        undone=[*renum, "router rows shifted"],
    )
    units = ["mlp units permutation"]
    add(
        "disguise: moe units permuted in every expert",
        save(root / "moe-atk-units", checked(permute_expert_units(base, 74), base, "units permuted")),
        one,
        "identical",
        undone=units,
    )
    add(
        "disguise: moe expert units permuted, experts renumbered",
        save(
            root / "moe-atk-units-renum", checked(permute_experts(permute_expert_units(base, 75), 76), base, "units, renumbered")
        ),
        one,
        "identical",
        undone=[*units, *renum],
    )
    add(
        "disguise: moe fine-tune, expert units permuted",
        save(root / "moe-atk-ft-units", permute_expert_units(ft1, 77)),
        one,
        "derived",
        parent="base",
        undone=units,
    )
    add(
        "disguise: moe residual rotated",
        save(root / "moe-atk-rot", checked(rotate_residual(base, 65), base, "rotated")),
        one,
        "identical",
        undone=["residual rotation"],
    )
    both = checked(permute_experts(rotate_residual(base, 66), 67), base, "rotated and renumbered")
    add(
        "disguise: moe rotated, experts renumbered, fused",
        save(root / "moe-atk-rot-renum", fused(both)),
        one,
        "identical",
        undone=["residual rotation", *renum],
    )
    add(
        "disguise: moe fine-tune rotated",
        save(root / "moe-atk-ft-rot", rotate_residual(ft1, 68)),
        one,
        "derived",
        parent="base",
        undone=["residual rotation"],
    )
    for a, b in ((0, 1), (0, 2), (1, 2)):
        add(f"unrelated moe seeds {a} vs {b}", p[f"moe-{b}"], {f"seed{a}": p[f"moe-{a}"]}, "unrelated")
    add(
        "disguise: unrelated moe, experts renumbered (control)",
        save(root / "moe-atk-other-renum", permute_experts(other, 69)),
        one,
        "unrelated",
    )
    add(
        "disguise: unrelated moe, rotated and renumbered (control)",
        save(root / "moe-atk-other-rot-renum", permute_experts(rotate_residual(other, 70), 71)),
        one,
        "unrelated",
    )


def qwen35_cases(root: Path, add) -> None:
    """Qwen3.5-MoE in miniature (QWEN35: linear attention, a shared expert, (1 + w) norms): a
    fused BF16 copy, a fine-tune, the disguises, and unrelated controls."""
    cfg = QWEN35

    def built(name: str, make) -> dict[str, torch.Tensor]:
        return _built(root, name, make, cfg)

    def checked(w: dict, before: dict, what: str) -> dict:
        return _checked(w, before, what, cfg)

    base = built("q35-0", lambda: train(None, "pretrain", steps=150, lr=3e-3, seed=0, cfg=cfg))
    other = built("q35-1", lambda: train(None, "pretrain", steps=150, lr=3e-3, seed=1, cfg=cfg))
    ft = built("q35-ft1", lambda: finetune(base, "ft-a", 11, cfg=cfg))
    one = {"base": root / "q35-0"}
    bf16 = {k: v.to(torch.bfloat16) for k, v in fused(base).items()}
    add("qwen3.5-moe fused bf16 copy", save(root / "q35-bf16", bf16, cfg), one, "identical")
    add(
        "qwen3.5-moe fine-tune vs base",
        root / "q35-ft1",
        {"base": root / "q35-0", "seed1": root / "q35-1"},
        "derived",
        parent="base",
    )
    for name, w, truth in (
        (
            "experts renumbered",
            checked(permute_experts(base, 81), base, "renumbered"),
            {"expect": "identical", "undone": ["experts renumbered"]},
        ),
        (
            "residual rotated",
            checked(rotate_residual(base, 82), base, "rotated"),
            {"expect": "identical", "undone": ["residual rotation"]},
        ),
        (
            "rotated, experts renumbered, fused",
            fused(checked(permute_experts(rotate_residual(base, 83), 84), base, "rotated and renumbered")),
            {"expect": "identical", "undone": ["residual rotation", "experts renumbered"]},
        ),
        (
            "fine-tune rotated, experts renumbered",
            checked(permute_experts(rotate_residual(ft, 85), 86), ft, "fine-tune disguised"),
            {"expect": "derived", "parent": "base", "undone": ["residual rotation", "experts renumbered"]},
        ),
        ("unrelated, rotated and renumbered (control)", permute_experts(rotate_residual(other, 87), 88), {"expect": "unrelated"}),
    ):
        folder = root / ("q35-atk-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
        add(f"disguise: qwen3.5-moe {name}", save(folder, w, cfg), one, **truth)
    add("unrelated qwen3.5-moe seeds 0 vs 1", root / "q35-1", {"seed0": root / "q35-0"}, "unrelated")


def shift_router(w: dict, seed: int) -> dict:
    """One random vector added to every row of each router: a softmax router's logits all move by
    the same amount per token, so it picks the same experts with the same weights."""
    g = torch.Generator().manual_seed(seed)
    out = dict(w)
    for k, v in w.items():
        if k.endswith(".mlp.gate.weight"):
            shift = v.double().std() * torch.randn(1, v.shape[1], generator=g, dtype=torch.float64)
            out[k] = (v.double() + shift).to(v.dtype)
    return out


def permute_expert_units(w: dict, seed: int) -> dict:
    """Every expert's (and the shared expert's) hidden units permuted: gate/up rows and down
    columns by one permutation per expert: the same function."""
    g = torch.Generator().manual_seed(seed)
    out = dict(w)
    for k in w:
        m = re.match(r"^(.+\.(?:experts\.\d+|shared_expert))\.gate_proj\.weight$", k)
        if m is None:
            continue
        p = m[1]
        perm = torch.randperm(w[k].shape[0], generator=g)
        out[p + ".gate_proj.weight"] = w[p + ".gate_proj.weight"][perm]
        out[p + ".up_proj.weight"] = w[p + ".up_proj.weight"][perm]
        out[p + ".down_proj.weight"] = w[p + ".down_proj.weight"][:, perm]
    return out
