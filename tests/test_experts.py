"""Mixtures of experts: renumbered experts and a rotated residual stream are seen through.

Qwen3-MoE-shaped models built and trained for real by transformers
(benchmarks/moe.py: 8 experts, top-2, a router per layer), saved one
tensor per expert as `save_pretrained` writes them, or fused as Qwen3.5's
BF16 release stores them. Every disguise is checked function-preserving
by running the model.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import moe  # noqa: E402
from lineage.audit import run_local  # noqa: E402
from lineage.modelset import ModelSet  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    base = moe.train(None, "pretrain", steps=150, lr=3e-3, seed=0)
    other = moe.train(None, "pretrain", steps=150, lr=3e-3, seed=1)
    ft = moe.finetune(base, "ft-a", 11)
    return root, base, other, ft


def audit(root, suspect: dict, cands: dict, name: str) -> dict:
    folder = moe.save(root / name, suspect)
    paths = {n: moe.save(root / f"{name}-{n}", w) for n, w in cands.items()}
    ms = ModelSet.from_dict(
        {
            "name": "moe",
            "suspects": [{"name": "suspect", "source": str(folder)}],
            "candidates": [{"name": n, "source": str(p)} for n, p in paths.items()],
        }
    )
    (v,) = run_local(ms, root / f"{name}-out")
    return v


def test_renumbered_experts_and_a_rotation_leave_the_function_unchanged(models):
    _, base, _, _ = models
    ref = moe.logits(base)
    for w in (moe.permute_experts(base, 3), moe.rotate_residual(base, 4)):
        assert (moe.logits(w) - ref).abs().max() < 1e-4 * ref.abs().max()


def test_a_copy_with_its_experts_renumbered_is_identical_in_either_layout(models):
    root, base, _, _ = models
    renum = moe.permute_experts(base, 3)
    v = audit(root, renum, {"base": base}, "renum")
    assert v["verdict"] == "identical" and v["parents"][0]["name"] == "base"
    assert "experts renumbered" in v["undone"]
    found = v["experts"]["base"]
    assert found["adopted"] and found["layers_renumbered"] == moe.MOE["layers"] and found["experts"] == moe.MOE["experts"]
    assert found["router_corr_before"] < 0.5 < 0.99 < found["router_corr_after"]
    # fused experts ([E, 2I, H] and [E, H, I], bf16) against the per-expert parent
    fused = {k: x.to(torch.bfloat16) for k, x in moe.fused(renum).items()}
    v = audit(root, fused, {"base": base}, "renum-fused")
    assert v["verdict"] == "identical" and "experts renumbered" in v["undone"]


def test_router_rows_shifted_by_one_vector_are_a_copy(models):
    """Adding one vector to every row of a softmax router changes no routing decision: with the
    experts renumbered as well, the copy is identical with both named; a fine-tune so shifted
    stays derived, and a router shifted unevenly is no copy."""
    root, base, _, ft = models
    shifted = moe.shift_router(base, 1)
    ref = moe.logits(base)
    assert (moe.logits(shifted) - ref).abs().max() < 1e-4 * ref.abs().max()
    v = audit(root, moe.permute_experts(shifted, 2), {"base": base}, "shift-renum")
    assert v["verdict"] == "identical" and v["undone"] == ["experts renumbered", "router rows shifted"]
    v = audit(root, moe.shift_router(ft, 3), {"base": base}, "ft-shift")
    assert v["verdict"] == "derived" and "router rows shifted" not in (v.get("undone") or [])
    uneven = dict(base)
    for k in base:
        if k.endswith("mlp.gate.weight"):
            uneven[k] = base[k] + 0.01 * base[k].std() * torch.randn(base[k].shape, generator=torch.Generator().manual_seed(4))
    v = audit(root, uneven, {"base": base}, "router-noise")
    assert v["verdict"] == "derived"


def test_units_permuted_inside_every_expert_are_undone(models):
    """Each expert's hidden units permuted (gate/up rows, down columns): the copy keeps little
    by name (inconclusive at first) and is identical once they are undone, also with its experts
    renumbered; a fine-tune so disguised is derived."""
    root, base, _, ft = models
    units = moe.permute_expert_units(base, 5)
    ref = moe.logits(base)
    assert (moe.logits(units) - ref).abs().max() < 1e-4 * ref.abs().max()
    v = audit(root, units, {"base": base}, "units")
    assert v["verdict"] == "identical" and v["undone"] == ["mlp units permutation"]
    v = audit(root, moe.permute_experts(moe.permute_expert_units(base, 6), 7), {"base": base}, "units-renum")
    assert v["verdict"] == "identical" and set(v["undone"]) == {"mlp units permutation", "experts renumbered"}
    v = audit(root, moe.permute_expert_units(ft, 8), {"base": base}, "ft-units")
    assert v["verdict"] == "derived" and v["parents"][0]["name"] == "base"


def test_a_fine_tune_with_its_experts_renumbered_is_derived_and_unrelated_models_stay_unrelated(models):
    root, base, other, ft = models
    v = audit(root, moe.permute_experts(ft, 4), {"base": base, "other": other}, "ft-renum")
    assert v["verdict"] == "derived" and v["parents"][0]["name"] == "base"
    assert "experts renumbered" in v["undone"]
    # controls: another model, as it is and with its experts renumbered, matches nothing
    for name, w in (("other", other), ("other-renum", moe.permute_experts(other, 5))):
        v = audit(root, w, {"base": base}, name)
        assert v["verdict"] == "unrelated", name
        assert not any(x["adopted"] for x in (v.get("experts") or {}).values()), name


def test_a_rotated_moe_is_identical_and_renumbering_on_top_is_undone_in_its_gauge(models):
    root, base, _, ft = models
    v = audit(root, moe.rotate_residual(base, 6), {"base": base}, "rot")
    assert v["verdict"] == "identical" and "residual rotation" in v["undone"]
    v = audit(root, moe.fused(moe.rotate_residual(ft, 7)), {"base": base}, "ft-rot-fused")
    assert v["verdict"] == "derived" and "residual rotation" in v["undone"]
    v = audit(root, moe.permute_experts(moe.rotate_residual(base, 8), 9), {"base": base}, "rot-renum")
    assert v["verdict"] == "identical"
    assert {"residual rotation", "experts renumbered"} <= set(v["undone"]) and v["experts"]["base"]["in_gauge"]


def test_a_blend_with_its_experts_renumbered_keeps_its_weights(models):
    root, base, other, ft = models
    ft2 = moe.finetune(base, "ft-b", 12)
    blend = {k: (0.6 * ft[k] + 0.4 * ft2[k]).to(torch.bfloat16) for k in base}
    v = audit(root, moe.permute_experts(blend, 10), {"base": base, "ft1": ft, "ft2": ft2}, "blend-renum")
    assert v["verdict"] == "blend" and "experts renumbered" in v["undone"]
    w = {p["name"]: p["weight"] for p in v["parents"]}
    assert abs(w["ft1"] - 0.6) < 0.01 and abs(w["ft2"] - 0.4) < 0.01


def test_qwen35_moe_in_disguise_is_seen_through(tmp_path):
    """Qwen3.5-397B-A17B's architecture in miniature (linear attention in three layers of four, a
    shared expert, norms that multiply by 1 + w): rotated with its experts renumbered and stored
    fused, a copy is identical with both disguises named; an unrelated model so disguised is not."""
    cfg = moe.QWEN35
    base = moe.train(None, "pretrain", steps=80, lr=3e-3, seed=0, cfg=cfg)
    other = moe.train(None, "pretrain", steps=80, lr=3e-3, seed=1, cfg=cfg)
    both = moe.permute_experts(moe.rotate_residual(base, 5), 6)
    ref = moe.logits(base, cfg)
    assert (moe.logits(both, cfg) - ref).abs().max() < 1e-4 * ref.abs().max()
    bp = moe.save(tmp_path / "base", base, cfg)
    for name, w, expect in (
        ("copy", moe.fused(both), "identical"),
        ("other", moe.permute_experts(moe.rotate_residual(other, 7), 8), "unrelated"),
    ):
        ms = ModelSet.from_dict(
            {
                "name": "q35",
                "suspects": [{"name": "suspect", "source": str(moe.save(tmp_path / name, w, cfg))}],
                "candidates": [{"name": "base", "source": str(bp)}],
            }
        )
        (v,) = run_local(ms, tmp_path / f"{name}-out")
        assert v["verdict"] == expect, name
        if expect == "identical":
            assert {"residual rotation", "experts renumbered"} <= set(v["undone"])


def test_disguised_copies_are_found_in_a_screened_pool(models, tmp_path):
    """A bulk audit against a pool larger than `bulk.screen_above` screens by name first: a copy
    with renumbered experts still keeps its parent (its attention screens it in) beside a
    sibling numbered as the copy is, and a rotated copy, whose parent screening drops, is found
    by the gauge all the same (not listed as screened out once it is the parent)."""
    _, base, other, ft = models
    pool = {"base": base, "other": other, "ft-numbered-as-the-copy": moe.permute_experts(ft, 11)}
    pool |= {f"init{s}": moe.train(None, "pretrain", steps=0, lr=0.0, seed=s) for s in (2, 3)}
    cands = [{"name": n, "source": str(moe.save(tmp_path / n, w))} for n, w in pool.items()]
    sus = {"renum": moe.permute_experts(base, 11), "rot": moe.rotate_residual(base, 12)}
    ms = ModelSet.from_dict(
        {
            "name": "pool",
            "suspects": [{"name": n, "source": str(moe.save(tmp_path / n, w))} for n, w in sus.items()],
            "candidates": cands,
        }
    )
    for v in run_local(ms, tmp_path / "out"):
        assert v["verdict"] == "identical" and v["parents"][0]["name"] == "base", v["suspect"]
        assert "base" not in [s["name"] for s in v["screened_out"]] and len(v["screened_out"]) >= 2
