"""Evaluation cases made the way the community makes merges (issue 14).

Per-layer and per-component schedules (mergekit's `value: [0.2, 0.8]`
gradients and `filter:` settings, the classic slerp recipe), sparse merges
trained further, frankenmerges that repeat layers, three-parent blends,
int4 round trips, LoRA and frozen-layer fine-tunes, and suspects whose true
parents are not in the pool. Each is built with torch (so CI, without
mergekit, runs them) and, where mergekit is installed, also with mergekit
from the configuration people publish. The models are 8-layer Llamas
(`DEEP`), so that a schedule has layers to vary over.

Each case carries its truth: the class, the parent for a single-parent
verdict, the weights, and for schedules every parent's weight per layer
and component (`schedule_truth`), from which benchmarks/evalset.py prints
the schedule error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from lineage.layout import component, layer_index

DEEP = {"hidden": 64, "inter": 176, "layers": 8, "heads": 4, "kv": 2, "vocab": 1000}

#: The classic slerp recipe (mergekit README, most model cards): t by layer, per filter.
SLERP_ATTN = [0.0, 0.5, 0.3, 0.7, 1.0]
SLERP_MLP = [1.0, 0.5, 0.7, 0.3, 0.0]


#: Training after a merge: a fifth of the fine-tunes' learning rate (benchmarks/evalset.finetune), 20 steps.
AFTER = {"steps": 20, "lr": 1e-4, "cfg": DEEP}


def moved(after: dict, before: dict, parent: dict, base: dict) -> float:
    """How far training moved a model, relative to a parent's delta from the base (stack matrices)."""
    num = sum(float((after[k].float() - before[k].float()).pow(2).sum()) for k in base if layer_index(k) is not None)
    den = sum(float((parent[k].float() - base[k].float()).pow(2).sum()) for k in base if layer_index(k) is not None)
    return math.sqrt(num / den)


def gradient(anchors: list[float], layer: int | None, layers: int) -> float:
    """mergekit's gradient: anchors spread evenly over t = layer / (layers - 1); outside the stack t = 0."""
    t = 0.0 if layer is None else layer / (layers - 1)
    scaled = t * (len(anchors) - 1)
    i0 = int(scaled)
    i1 = min(len(anchors) - 1, i0 + 1)
    return (1 - (scaled - i0)) * anchors[i0] + (scaled - i0) * anchors[i1]


def by_filter(name: str, settings: dict[str, list[float]], default: list[float], layers: int) -> float:
    """A `filter:` list as mergekit applies it: the first filter that is a substring of the name."""
    for f, anchors in settings.items():
        if f in name:
            return gradient(anchors, layer_index(name), layers)
    return gradient(default, layer_index(name), layers)


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's slerp of one tensor (normalised directions, lerp when nearly parallel)."""
    a64, b64 = a.double(), b.double()
    an, bn = a64 / a64.norm(), b64 / b64.norm()
    dot = float((an * bn).sum())
    if abs(dot) > 0.9995:
        return ((1 - t) * a64 + t * b64).float()
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)).float()


def int4(w: dict[str, torch.Tensor], group: int = 32) -> dict[str, torch.Tensor]:
    """Round trip through 4-bit group-wise quantisation (min-max, 16 levels per group of
    `group` inputs, as RTN/GPTQ store it) of every matrix of the stack; the rest unchanged."""
    out = {}
    for k, v in w.items():
        if v.ndim != 2 or layer_index(k) is None or v.shape[1] % group:
            out[k] = v
            continue
        g = v.float().reshape(v.shape[0], -1, group)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-12) / 15
        out[k] = (torch.round((g - lo) / scale).clamp(0, 15) * scale + lo).reshape(v.shape)
    return out


def model_stock(base: dict[str, torch.Tensor], tuned: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Model Stock as mergekit computes it, per tensor: t avg + (1 - t) base, t = N cos / (1 + (N - 1) cos)."""
    out = {}
    n = len(tuned)
    for k, b in base.items():
        d = [(f[k] - b).double().flatten() for f in tuned]
        cos = [float(d[i] @ d[j] / max(float(d[i].norm() * d[j].norm()), 1e-6)) for i in range(n) for j in range(i + 1, n)]
        c = max(-1.0, min(1.0, sum(cos) / len(cos)))
        t = 0.0 if abs(1 + (n - 1) * c) < 1e-6 else n * c / (1 + (n - 1) * c)
        out[k] = (t * sum(f[k] for f in tuned) / n + (1 - t) * b).float()
    return out


def stack(parts: list[tuple[dict[str, torch.Tensor], int, int]]) -> dict[str, torch.Tensor]:
    """A passthrough frankenmerge as mergekit makes it: layers [start, end) of each model in turn,
    renumbered; the embeddings from the first model, the final norm and head from the last."""
    out = {k: v for k, v in parts[0][0].items() if layer_index(k) is None and "embed" in k}
    out |= {k: v for k, v in parts[-1][0].items() if layer_index(k) is None and "embed" not in k}
    n = 0
    for w, start, end in parts:
        for i in range(start, end):
            for k, v in w.items():
                if layer_index(k) == i:
                    out[k.replace(f".layers.{i}.", f".layers.{n}.")] = v.clone()
            n += 1
    return out


def schedule_truth(names: list[str], weight: Callable[[str], float]) -> dict[str, dict[str, list[float]]]:
    """component -> per-layer weight of one parent, over the stack's matrices (the truth a schedule is scored on)."""
    out: dict[str, dict[int, float]] = {}
    for k in names:
        layer = layer_index(k)
        if layer is not None and not k.endswith("norm.weight"):
            out.setdefault(component(k), {})[layer] = weight(k)
    return {c: [v[i] for i in sorted(v)] for c, v in out.items()}


def cases(
    root: Path, add: Callable, built: Callable, finetune: Callable, llama: Callable, save: Callable, mergekit: Callable
) -> None:
    """Add the cases to the evaluation set (`add` as in benchmarks/evalset.py)."""
    L = DEEP["layers"]
    d0 = built("deep-0", lambda: llama(200, DEEP))
    d1 = built("deep-1", lambda: llama(201, DEEP))
    far = built("deep-2", lambda: llama(202, DEEP))
    ft = {i: built(f"deep-ft{i}", lambda i=i: finetune(d0, f"ft-{'abc'[i - 1]}", 210 + i, cfg=DEEP)) for i in (1, 2, 3)}
    p = {n: root / n for n in ("deep-0", "deep-1", "deep-2", "deep-ft1", "deep-ft2", "deep-ft3")}
    fam = {"base": p["deep-0"], "ft1": p["deep-ft1"], "ft2": p["deep-ft2"]}
    fam3 = {**fam, "ft3": p["deep-ft3"]}
    unrel = {"seed0": p["deep-0"], "seed1": p["deep-1"]}
    names = list(d0)

    def out(name: str, w: dict) -> Path:
        return save(root / name, {k: v.to(torch.bfloat16) for k, v in w.items()}, shape=DEEP)

    # -- schedules ---------------------------------------------------------------------------
    def w_grad(k: str) -> float:
        return gradient([0.2, 0.8], layer_index(k), L)

    lin = {k: w_grad(k) * ft[1][k] + (1 - w_grad(k)) * ft[2][k] for k in names}
    truth = {"ft1": schedule_truth(names, w_grad)}
    add("linear gradient 0.2->0.8 (torch)", out("w-grad", lin), fam, "blend", method="linear", schedule=truth)
    filt = {"self_attn": [0.7], "mlp": [0.3]}

    def w_filt(k: str) -> float:
        return by_filter(k, filt, [0.5], L)

    pf = {k: w_filt(k) * ft[1][k] + (1 - w_filt(k)) * ft[2][k] for k in names}
    add(
        "linear per-filter 0.7 attn / 0.3 mlp (torch)",
        out("w-filter", pf),
        fam,
        "blend",
        method="linear",
        schedule={"ft1": schedule_truth(names, w_filt)},
    )
    recipe = {"self_attn": SLERP_ATTN, "mlp": SLERP_MLP}

    def t_slerp(k: str) -> float:
        return by_filter(k, recipe, [0.5], L)

    sl = {k: slerp_tensor(d0[k], d1[k], t_slerp(k)) for k in names}
    add(
        "slerp recipe, t by layer and filter (torch)",
        out("w-slerp", sl),
        unrel,
        "blend",
        method="slerp",
        schedule={"seed1": schedule_truth(names, t_slerp)},
    )
    # -- sparse merges and blends trained afterwards -------------------------------------------
    gd = torch.Generator().manual_seed(31)
    dare = {}
    for k in names:
        kept = [(torch.rand(d0[k].shape, generator=gd) < 0.5).float() * 2 * (ft[i][k] - d0[k]) for i in (1, 2)]
        dare[k] = d0[k] + 0.5 * kept[0] + 0.5 * kept[1]
    dare_t = built("w-dare-trained-w", lambda: finetune(dare, "ft-c", 33, **AFTER))
    add(
        "dare 0.5, then trained (torch)",
        out("w-dare-trained", dare_t),
        fam,
        "blend",
        parents={"ft1", "ft2"},
        note=f"training moved it {moved(dare_t, dare, ft[1], d0):.2f} of ft1's delta",
    )
    # -- what happened after the merge ---------------------------------------------------------
    mix64 = {k: 0.6 * ft[1][k] + 0.4 * ft[2][k] for k in names}
    tail = built("w-after-layers-w", lambda: finetune(mix64, "ft-c", 34, trainable=lambda k: layer_index(k) in (6, 7), **AFTER))
    add(
        "linear 0.6/0.4, then layers 6-7 trained (torch)",
        out("w-after-layers", tail),
        fam,
        "blend",
        {"ft1": 0.6, "ft2": 0.4},
        after="layers",
    )
    gn = torch.Generator().manual_seed(35)
    noisy = {k: v + 0.007 * v.std() * torch.randn(v.shape, generator=gn) for k, v in mix64.items()}
    add(
        "linear 0.6/0.4 + 0.7% noise (torch)",
        out("w-after-noise", noisy),
        fam,
        "blend",
        {"ft1": 0.6, "ft2": 0.4},
        after="uniform",
    )
    add("linear 0.6/0.4, nothing after (torch)", out("w-after-none", mix64), fam, "blend", {"ft1": 0.6, "ft2": 0.4}, after="none")
    # -- three parents -----------------------------------------------------------------------
    three = {k: 0.5 * ft[1][k] + 0.3 * ft[2][k] + 0.2 * ft[3][k] for k in names}
    add("linear 0.5/0.3/0.2, three parents (torch)", out("w-three", three), fam3, "blend", {"ft1": 0.5, "ft2": 0.3, "ft3": 0.2})
    stock = model_stock(d0, [ft[1], ft[2], ft[3]])
    add(
        "model stock of three fine-tunes (torch)",
        out("w-stock", stock),
        fam3,
        "blend",
        method="model_stock",
        parents={"ft1", "ft2", "ft3"},
    )
    # -- frankenmerges with repeated layers -----------------------------------------------------
    rep_map = {str(i): i for i in range(5)} | {str(i): i - 2 for i in range(5, 10)}
    add(
        "frankenmerge of ft1: layers 0-4 + 3-7 (torch)",
        save(root / "w-franken1", stack([(ft[1], 0, 5), (ft[1], 3, 8)]), shape=DEEP | {"layers": 10}),
        fam,
        "derived",
        parent="ft1",
        layer_map=rep_map,
    )
    add(
        "frankenmerge: ft1 0-4 + ft2 3-7 (torch)",
        save(root / "w-franken2", stack([(ft[1], 0, 5), (ft[2], 3, 8)]), shape=DEEP | {"layers": 10}),
        fam,
        "blend",
        method="passthrough",
        layer_sources={i: ("ft1", j) if int(i) < 5 else ("ft2", j) for i, j in rep_map.items()},
    )
    up_map = {str(i): i for i in range(6)} | {str(i): i - 4 for i in range(6, 12)}
    add(
        "upscale: seed0 0-5 + seed1 2-7 (torch)",
        save(root / "w-upscale", stack([(d0, 0, 6), (d1, 2, 8)]), shape=DEEP | {"layers": 12}),
        unrel,
        "blend",
        method="passthrough",
        layer_sources={i: ("seed0", j) if int(i) < 6 else ("seed1", j) for i, j in up_map.items()},
    )
    # -- quantised, LoRA, frozen -----------------------------------------------------------------
    add("int4 g32 of ft1", out("w-int4-ft", int4(ft[1])), fam, "derived", parent="ft1")
    ub = {k: 0.6 * d0[k] + 0.4 * d1[k] for k in names}
    add("int4 g32 of a 0.6/0.4 blend", out("w-int4-blend", int4(ub)), unrel, "blend", {"seed0": 0.6, "seed1": 0.4})
    lora = built("w-lora-w", lambda: finetune(d0, "ft-a", 41, steps=40, lr=2e-3, cfg=DEEP, lora=8))
    add("LoRA r8 fine-tune, merged", out("w-lora", lora), {"base": p["deep-0"], "seed1": p["deep-1"]}, "derived", parent="base")
    frozen = built(
        "w-frozen-w", lambda: finetune(d0, "ft-b", 42, steps=40, cfg=DEEP, trainable=lambda k: layer_index(k) in (6, 7))
    )
    add(
        "fine-tune of layers 6-7 only",
        out("w-frozen", frozen),
        {"base": p["deep-0"], "seed1": p["deep-1"]},
        "derived",
        parent="base",
    )
    # -- true parents absent from the pool ------------------------------------------------------
    ftft = built("w-ftft-w", lambda: finetune(ft[1], "ft-c", 43, cfg=DEEP))
    # In these small models every fine-tune of the base mostly continues its (short) pretraining, so
    # siblings' deltas correlate at about 0.6: a fine-tune of ft1 sits as far along ft2's delta as ft2
    # itself, and which of the two it descends from cannot be told (only its class is checked).
    add(
        "fine-tune of ft1 vs base + ft2",
        out("w-ftft", ftft),
        {"base": p["deep-0"], "ft2": p["deep-ft2"]},
        "derived",
        declared="base",
    )
    mix = {k: 0.5 * ft[1][k] + 0.5 * ft[2][k] for k in names}
    add(
        "blend of ft1+ft2 vs base + ft3",
        out("w-mix", mix),
        {"base": p["deep-0"], "ft3": p["deep-ft3"]},
        "derived",
        parent="base",
        declared="base",
    )
    add("ft1 vs its siblings ft2 + ft3", p["deep-ft1"], {"ft2": p["deep-ft2"], "ft3": p["deep-ft3"]}, "derived", no_parent=True)
    add(
        "ft1 vs base + siblings ft2, ft3",
        p["deep-ft1"],
        {"base": p["deep-0"], "ft2": p["deep-ft2"], "ft3": p["deep-ft3"]},
        "derived",
        parent="base",
        declared="base",
    )
    add("fine-tune of an outsider", out("w-outsider", finetune(far, "ft-a", 44, cfg=DEEP)), fam, "unrelated")

    # -- the same with mergekit, from the configurations people publish ---------------------------
    def mk(name: str, config: str) -> Path | None:
        return mergekit(root / f"mk-{name}", config.format(**{k: str(v) for k, v in p.items()}))

    folder = mk(
        "w-grad",
        "merge_method: linear\nmodels:\n  - model: {deep-ft1}\n    parameters: {{weight: [0.2, 0.8]}}\n"
        "  - model: {deep-ft2}\n    parameters: {{weight: [0.8, 0.2]}}\ndtype: bfloat16\n",
    )
    if folder is not None:
        add("mergekit linear gradient [0.2, 0.8]", folder, fam, "blend", method="linear", schedule=truth)
    folder = mk(
        "w-slerp",
        "merge_method: slerp\nbase_model: {deep-0}\nslices:\n  - sources:\n      - model: {deep-0}\n        layer_range: [0, 8]\n"
        "      - model: {deep-1}\n        layer_range: [0, 8]\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
        "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: bfloat16\n",
    )
    if folder is not None:
        add(
            "mergekit slerp recipe (t by filter)",
            folder,
            unrel,
            "blend",
            method="slerp",
            schedule={"seed1": schedule_truth(names, t_slerp)},
        )
    for method in ("dare_linear", "ties"):
        folder = mk(
            f"w-{method}",
            f"merge_method: {method}\nbase_model: {{deep-0}}\nmodels:\n  - model: {{deep-ft1}}\n    parameters: {{{{weight: 0.5, density: 0.5}}}}\n"
            "  - model: {deep-ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: float32\n",
        )
        if folder is not None:
            merged = built(f"w-{method}-trained-w", lambda folder=folder: finetune(_load(folder), "ft-c", 45, **AFTER))
            add(
                f"mergekit {method} 0.5, then trained",
                out(f"w-{method}-trained", merged),
                fam,
                "blend",
                parents={"ft1", "ft2"},
                note=f"training moved it {moved(merged, _load(folder), ft[1], d0):.2f} of ft1's delta",
            )
    folder = mk(
        "w-three",
        "merge_method: linear\nmodels:\n  - model: {deep-ft1}\n    parameters: {{weight: 0.5}}\n  - model: {deep-ft2}\n"
        "    parameters: {{weight: 0.3}}\n  - model: {deep-ft3}\n    parameters: {{weight: 0.2}}\ndtype: bfloat16\n",
    )
    if folder is not None:
        add("mergekit linear, three parents", folder, fam3, "blend", {"ft1": 0.5, "ft2": 0.3, "ft3": 0.2})
    folder = mk(
        "w-franken",
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {deep-ft1}\n        layer_range: [0, 5]\n"
        "  - sources:\n      - model: {deep-ft2}\n        layer_range: [3, 8]\ndtype: bfloat16\n",
    )
    if folder is not None:
        add(
            "mergekit passthrough ft1 0-4 + ft2 3-7",
            folder,
            fam,
            "blend",
            method="passthrough",
            layer_sources={i: ("ft1", j) if int(i) < 5 else ("ft2", j) for i, j in rep_map.items()},
        )
    folder = mk(
        "w-model-stock",
        "merge_method: model_stock\nbase_model: {deep-0}\nmodels:\n  - model: {deep-ft1}\n  - model: {deep-ft2}\n  - model: {deep-ft3}\ndtype: bfloat16\n",
    )
    if folder is not None:
        add("mergekit model_stock, three fine-tunes", folder, fam3, "blend", method="model_stock", parents={"ft1", "ft2", "ft3"})
    folder = mk(
        "w-sce",
        "merge_method: sce\nbase_model: {deep-0}\nmodels:\n  - model: {deep-ft1}\n  - model: {deep-ft2}\n  - model: {deep-ft3}\n"
        "parameters: {{select_topk: 0.7}}\ndtype: bfloat16\n",
    )
    if folder is not None:
        add("mergekit sce, three fine-tunes", folder, fam3, "blend", family="sce", parents={"ft1", "ft2", "ft3"})


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= {k: v.float() for k, v in load_file(str(f)).items()}
    return out
