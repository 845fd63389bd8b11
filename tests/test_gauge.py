"""A disguised residual stream (issue 15): hidden-dimension permutations and rotations undone.

Llama-shaped models at their random initialisation (the gauge arithmetic
does not need training; the evaluation set's attack suite runs the same
disguises on trained models and MiniLM), each disguise checked to leave
the model's output unchanged by running it, audited end to end with
`run_local` on real safetensors files."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import attacks
from benchmarks.evalset import init_llama, save
from lineage.audit import run_local
from lineage.explain import gauge as gauge_refiner
from lineage.gauge import Gauge, gauge_from, procrustes, role, snap
from lineage.modelset import ModelSet

CFG = {"hidden": 64, "inter": 160, "layers": 2, "heads": 4, "kv": 2, "vocab": 600}


def audit(tmp_path, name: str, suspect: dict, cands: dict[str, dict]) -> dict:
    root = tmp_path / name
    s = save(root / "suspect", suspect, shape=CFG)
    members = [{"name": n, "source": str(save(root / n, w, shape=CFG))} for n, w in cands.items()]
    ms = ModelSet.from_dict({"name": "g", "suspects": [{"name": "suspect", "source": str(s)}], "candidates": members})
    (v,) = run_local(ms, root / "out")
    return v


@pytest.fixture(scope="module")
def models():
    return init_llama(1, CFG), init_llama(2, CFG)


def test_the_disguises_leave_the_function_unchanged(models):
    base, _ = models
    for w in (
        attacks.permute_hidden(base, 1),
        attacks.rotate_residual(base, 2, new_gains=True),
        attacks.everything(base, 3, CFG["heads"], CFG["kv"]),
    ):
        assert attacks.check(base, w, CFG) < 1e-5
        assert abs(
            float(w["model.layers.0.mlp.down_proj.weight"].flatten() @ base["model.layers.0.mlp.down_proj.weight"].flatten())
        ) < (0.2 * float(base["model.layers.0.mlp.down_proj.weight"].norm() ** 2))


def test_procrustes_recovers_a_rotation_and_snaps_a_permutation():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(500, 32, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    assert torch.allclose(procrustes(e, e @ q), q, atol=1e-10)
    perm = torch.randperm(32, generator=g)
    p = torch.eye(32, dtype=torch.float64)[:, perm]
    found = snap(procrustes(e, e @ p), signed=False)
    assert found is not None and (found[0] == perm.numpy()).all()
    assert snap(q, signed=True) is None
    gz = gauge_from(procrustes(e, e @ p), fold=False, signed=False)
    assert gz.kind == "permutation" and torch.equal(gz.apply(e, "embed"), e @ p)
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    rot = Gauge(q.numpy(), None, None, True)
    assert torch.allclose(rot.apply(w.T.contiguous(), "writes"), q.T @ w.T, atol=1e-12)


def test_roles_of_llama_and_bert_tensors():
    assert role("model.embed_tokens.weight") == "embed"
    assert role("model.layers.3.self_attn.k_proj.weight") == "reads"
    assert role("model.layers.3.mlp.down_proj.weight") == "writes"
    assert role("model.layers.3.self_attn.q_norm.weight") is None  # per head, not the residual stream
    assert role("bert.encoder.layer.0.output.dense.weight") == "writes"
    assert role("encoder.layer.0.attention.output.dense.bias") == "vec"
    assert role("encoder.layer.0.attention.self.query.bias") is None


def test_permuted_copy_is_identical_with_the_disguise_named(tmp_path, models):
    base, other = models
    v = audit(tmp_path, "perm", attacks.permute_hidden(base, 5), {"base": base, "other": other})
    assert v["verdict"] == "identical" and v["parents"][0]["name"] == "base"
    assert v["undone"] == ["residual permutation"]
    g = v["gauge"]["base"]
    assert g["found"] == "permutation" and g["from_permutation"] < 1e-9 and g["median_corr_after"] > 0.999
    assert g["median_corr_before"] < 0.2
    assert v["gauge"]["other"]["found"] is None


def test_rotated_fine_tune_with_new_gains_is_derived_and_a_rotated_blend_keeps_its_weights(tmp_path, models):
    base, other = models
    g = torch.Generator().manual_seed(7)
    tuned = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v for k, v in base.items()}
    v = audit(tmp_path, "ft", attacks.rotate_residual(tuned, 6, new_gains=True), {"base": base})
    assert v["verdict"] == "derived" and v["undone"] == ["residual rotation"]
    assert "rotation" in v["explanation"] and v["gauge"]["base"]["found"] == "rotation"
    mix = {k: 0.7 * base[k] + 0.3 * tuned[k] if base[k].ndim == 2 else base[k] for k in base}
    v = audit(tmp_path, "blend", attacks.rotate_residual(mix, 8, new_gains=True), {"base": base, "tuned": tuned, "other": other})
    assert v["verdict"] == "blend"
    w = {p["name"]: p["weight"] for p in v["parents"]}
    assert math.isclose(w["base"], 0.7, abs_tol=0.01) and math.isclose(w["tuned"], 0.3, abs_tol=0.01)
    recipe = (tmp_path / "blend" / "out" / v["recipe"]).read_text()
    assert "# the suspect is disguised (residual rotation)" in recipe


def test_a_rotated_unrelated_model_stays_unrelated_even_when_refitted(tmp_path, models, monkeypatch):
    """The refit in a transformed gauge is judged on matrices the transform was not fitted to:
    forcing it for an unrelated pair (the embedding gate off) must not relate them."""
    base, other = models
    monkeypatch.setattr(gauge_refiner, "GAUGE_MIN_CORR", -1.0)
    monkeypatch.setattr(gauge_refiner, "GAUGE_MIN_GAIN", -1.0)
    v = audit(tmp_path, "unrel", attacks.rotate_residual(other, 9, new_gains=True), {"base": base})
    assert v["verdict"] == "unrelated"
    g = v["gauge"]["base"]
    assert g["found"] is None and g["frac_significant_after"] == 0.0
    assert abs(g["median_corr_after"]) < 0.05


def test_invariant_products_do_not_change_under_head_and_unit_disguises(models):
    from lineage.invariants import probe, sandwich

    base, _ = models
    w = attacks.transform_vo(
        attacks.transform_qk(attacks.scale_mlp_units(base, 1), 2, CFG["heads"], CFG["kv"]), 3, CFG["heads"], CFG["kv"]
    )
    p = "model.layers.1."
    parts = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    a = {k: base[f"{p}{n}.weight"].double() for k, n in parts.items()}
    b = {k: w[f"{p}{n}.weight"].double() for k, n in parts.items()}
    s = probe(CFG["hidden"])
    hd = CFG["hidden"] // CFG["heads"]
    for kind in ("qk", "ov", "mlp"):
        x, y = sandwich(kind, a, hd, s), sandwich(kind, b, hd, s)
        assert (x - y).norm() / x.norm() < 1e-5, kind
        assert (a[{"qk": "q", "ov": "v", "mlp": "up"}[kind]] - b[{"qk": "q", "ov": "v", "mlp": "up"}[kind]]).norm() > 0.1


def test_head_and_unit_disguises_of_a_copy_are_seen_through(tmp_path, models):
    base, other = models
    v = audit(tmp_path, "mlp", attacks.scale_mlp_units(base, 11), {"base": base, "other": other})
    assert v["verdict"] == "identical" and v["undone"] == ["MLP units rescaled or permuted"]
    assert v["invariants"]["mlp"]["frac_significant"] == 1.0 and v["invariants"]["mlp"]["max_rel_dist"] < 1e-6
    v = audit(tmp_path, "all", attacks.everything(base, 12, CFG["heads"], CFG["kv"]), {"base": base})
    assert v["verdict"] == "identical"
    assert set(v["undone"]) == {
        "residual rotation",
        "Q/K heads transformed or permuted",
        "V/O heads transformed or permuted",
        "MLP units rescaled or permuted",
    }
    g = torch.Generator().manual_seed(13)
    tuned = {k: x + 0.05 * x.std() * torch.randn(x.shape, generator=g) if x.ndim == 2 else x for k, x in base.items()}
    v = audit(tmp_path, "tuned", attacks.scale_mlp_units(tuned, 14), {"base": base})
    assert v["verdict"] == "derived" and "MLP units rescaled or permuted" in v["undone"]


def test_gemma_norms_fold_as_one_plus_w(tmp_path, models):
    """Gemma's RMSNorm multiplies by (1 + w): a rotated Gemma-style copy (the gains 1 + w folded
    into the readers, the stored w then 0) is identical once its gains are folded as 1 + w."""
    import json

    base, _ = models
    g = torch.Generator().manual_seed(21)
    gem = {k: 0.1 * torch.randn(v.shape, generator=g) if k.endswith("norm.weight") else v for k, v in base.items()}
    effective = {k: v + 1 if k.endswith("norm.weight") else v for k, v in gem.items()}  # what the norms multiply by
    rotated = attacks.rotate_residual(effective, 22)  # folds the gains, rotates; the gains are then 1...
    disguised = {k: v - 1 if k.endswith("norm.weight") else v for k, v in rotated.items()}  # ...stored as w = 0
    assert attacks.check(effective, {k: v + 1 if k.endswith("norm.weight") else v for k, v in disguised.items()}, CFG) < 1e-5
    root = tmp_path / "gemma"
    paths = {n: save(root / n, w, shape=CFG) for n, w in (("suspect", disguised), ("base", gem))}
    for p in paths.values():
        cfg = json.loads((p / "config.json").read_text())
        (p / "config.json").write_text(json.dumps(cfg | {"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    ms = ModelSet.from_dict(
        {
            "name": "g",
            "suspects": [{"name": "suspect", "source": str(paths["suspect"])}],
            "candidates": [{"name": "base", "source": str(paths["base"])}],
        }
    )
    (v,) = run_local(ms, root / "out")
    assert v["verdict"] == "identical" and v["undone"] == ["residual rotation"]


def test_a_reordered_vocabulary_is_aligned_by_token_strings(tmp_path, models):
    """Token ids reordered with the tokenizer rewritten (the function unchanged): the rows are
    paired by their token strings in tokenizer.json, and the copy is identical."""
    import json

    base, _ = models
    tok = attacks.plain_tokenizer(CFG["vocab"])
    w, tok2 = attacks.permute_vocab(attacks.permute_hidden(base, 23), tok, 24)
    assert attacks.vocab_check(base, w, tok, tok2, CFG) < 1e-5
    root = tmp_path / "vocab"
    paths = {n: save(root / n, m, shape=CFG) for n, m in (("suspect", w), ("base", base))}
    (paths["suspect"] / "tokenizer.json").write_text(json.dumps(tok2))
    (paths["base"] / "tokenizer.json").write_text(json.dumps(tok))
    ms = ModelSet.from_dict(
        {
            "name": "g",
            "suspects": [{"name": "suspect", "source": str(paths["suspect"])}],
            "candidates": [{"name": "base", "source": str(paths["base"])}],
        }
    )
    (v,) = run_local(ms, root / "out")
    assert v["verdict"] == "identical" and v["undone"] == ["vocabulary reordered", "residual permutation"]
    assert v["gauge"]["base"]["vocabulary"] == {"shared_tokens": CFG["vocab"], "reordered": True}
    # a hostile tokenizer.json (ids that are not row numbers) is reported, not followed
    (paths["suspect"] / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": -1, "b": "x"}}}))
    (v,) = run_local(ms, root / "out2")
    assert v["verdict"] != "identical"
    assert any("not a row number" in w_ for w_ in v.get("warnings", []))


def test_tokenizer_vocabularies_of_every_kind():
    from lineage.tokens import shared_rows, vocab_of

    assert vocab_of({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 2, "content": "<s>"}]}, "t") == (
        {"a": 0, "b": 1, "<s>": 2},
        None,
    )
    assert vocab_of({"model": {"vocab": [["a", -1.0], ["b", -2.0]]}}, "t") == ({"a": 0, "b": 1}, None)
    assert vocab_of({"model": {}}, "t")[0] is None
    s, c = shared_rows({"a": 0, "b": 1, "c": 2}, {"c": 0, "a": 1, "z": 2}, 3, 3)
    assert s.tolist() == [0, 2] and c.tolist() == [1, 0]


def test_units_permuted_after_the_residual_are_undone_in_its_gauge(tmp_path, models):
    """Permutations are searched again in the adopted gauge (the parent rotated into the
    suspect's, gains folded): a rotated copy with its MLP units permuted is identical."""
    from benchmarks.evalset import permute_mlp

    base, _ = models
    w = permute_mlp(attacks.rotate_residual(base, 31, new_gains=True), 32)
    assert attacks.check(base, w, CFG) < 1e-5
    v = audit(tmp_path, "rot-units", w, {"base": base})
    assert v["verdict"] == "identical" and v["undone"] == ["residual rotation", "mlp units permutation"]
    assert all(p["corr_after"] > 0.999 for p in v["permutation"])
