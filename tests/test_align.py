"""Alignment across prefixes, fused vs per-expert experts, and vocabularies."""

from __future__ import annotations

import torch

from lineage.align import align
from lineage.engines import accumulate
from lineage.fit import single
from lineage.layout import canonical, component, layer_index
from lineage.options import FitOptions
from lineage.reader import Reader
from lineage.source import resolve
from tests.common import write_model

E, INTER, H = 4, 24, 16


def fused():
    torch.manual_seed(1)
    return {
        "model.language_model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * INTER, H),
        "model.language_model.layers.0.mlp.experts.down_proj": torch.randn(E, H, INTER),
        "model.language_model.embed_tokens.weight": torch.randn(50, H),
        "model.language_model.layers.0.input_layernorm.weight": torch.ones(H),
    }


def per_expert(f, prefix="model."):
    out = {}
    gu = f["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    dn = f["model.language_model.layers.0.mlp.experts.down_proj"]
    for j in range(E):
        out[f"{prefix}layers.0.mlp.experts.{j}.gate_proj.weight"] = gu[j, :INTER]
        out[f"{prefix}layers.0.mlp.experts.{j}.up_proj.weight"] = gu[j, INTER:]
        out[f"{prefix}layers.0.mlp.experts.{j}.down_proj.weight"] = dn[j]
    out[f"{prefix}embed_tokens.weight"] = torch.cat([f["model.language_model.embed_tokens.weight"], torch.randn(7, H)])
    out[f"{prefix}layers.0.input_layernorm.weight"] = torch.ones(H)
    return out


def _compare_all(sus, cand):
    groups, unmatched = align(sus, [cand])
    out = {}
    with Reader() as r:
        for g in groups:
            assert g.status == "ok", g.reason
            out[g.tensor] = single(accumulate(g, r, FitOptions(chunk_bytes=1 << 10)), cand.name)
    return out, unmatched


def test_fused_suspect_against_per_expert_candidate(tmp_path):
    f = fused()
    write_model(tmp_path / "f", f)
    write_model(tmp_path / "p", per_expert(f), shards=3)
    res, unmatched = _compare_all(resolve("f", str(tmp_path / "f")), resolve("p", str(tmp_path / "p")))
    assert len(res) == 4
    for name, sg in res.items():
        assert sg.exact_frac == 1.0, name  # same values, different layout and vocab size
    assert unmatched == {"p": []}


def test_per_expert_suspect_against_fused_candidate(tmp_path):
    f = fused()
    write_model(tmp_path / "f", f)
    write_model(tmp_path / "p", per_expert(f, prefix="language_model.model."))
    res, _ = _compare_all(resolve("p", str(tmp_path / "p")), resolve("f", str(tmp_path / "f")))
    assert len(res) == 3 * E + 2
    assert all(sg.exact_frac == 1.0 for sg in res.values())


def test_unpaired_tensors_keep_a_reason(tmp_path):
    write_model(tmp_path / "s", {"a.weight": torch.randn(3, 3), "extra.weight": torch.randn(2, 2), "b.weight": torch.randn(4, 4)})
    write_model(tmp_path / "c", {"a.weight": torch.randn(3, 3), "b.weight": torch.randn(4, 5), "spare.weight": torch.randn(1)})
    groups, unmatched = align(resolve("s", str(tmp_path / "s")), [resolve("c", str(tmp_path / "c"))])
    g = {g.tensor: g for g in groups}
    assert g["a.weight"].status == "ok"
    assert g["extra.weight"].status == "skipped" and "no tensor with this name" in g["extra.weight"].reason
    assert g["b.weight"].status == "skipped" and "shape mismatch: suspect [4, 4] vs b.weight [4, 5]" in g["b.weight"].reason
    assert unmatched == {"c": ["b.weight", "spare.weight"]}


def test_layout_tables():
    assert canonical("model.language_model.layers.3.mlp.gate.weight") == "layers.3.mlp.gate.weight"
    assert canonical("language_model.model.norm.weight") == "norm.weight"
    assert component("model.layers.1.self_attn.q_norm.weight") == "norm"
    assert component("model.layers.1.mlp.gate.weight") == "router"
    assert component("model.layers.1.mlp.experts.3.up_proj.weight") == "expert"
    assert component("model.layers.1.mlp.experts.gate_up_proj") == "expert"
    assert component("encoder.layer.0.attention.output.dense.weight") == "attention"
    assert component("encoder.layer.0.output.dense.weight") == "mlp"
    assert component("embeddings.word_embeddings.weight") == "embedding"
    assert component("lm_head.weight") == "head"
    assert layer_index("model.language_model.layers.17.linear_attn.A_log") == 17
    assert layer_index("mtp.layers.0.mlp.gate.weight") is None
