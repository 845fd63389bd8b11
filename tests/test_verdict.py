"""Verdict rules on built families: siblings are not blends, aliases never split weight."""

from __future__ import annotations

import pyarrow.parquet as pq
import torch

from lineage.audit import run_local
from lineage.modelset import ModelSet
from tests.common import modelset, write_model

SHAPES = {
    f"layers.{i}.{n}.weight": s for i in range(3) for n, s in (("q_proj", (96, 64)), ("up_proj", (128, 64)), ("norm", (64,)))
}


def family(seed: int = 0, tunes: int = 2):
    """A base, `tunes` fine-tune-like children whose deltas share a direction, and the generator."""
    g = torch.Generator().manual_seed(seed)

    def rnd(shape):
        return torch.randn(shape, generator=g)

    base = {k: (1 + 0.1 * rnd(s)) if len(s) == 1 else rnd(s) / 8 for k, s in SHAPES.items()}

    def tune(common, scale=0.05):
        return {k: v + scale * v.std() * (0.6 * common[k] + 0.8 * rnd(v.shape)) for k, v in base.items()}

    common = {k: rnd(v.shape) for k, v in base.items()}  # shared direction: siblings' deltas correlate
    return base, *(tune(common) for _ in range(tunes)), rnd


def test_sibling_fine_tune_is_derived_not_blend(tmp_path):
    base, ft1, ft2, _ = family()
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "ft1", ft1)
    write_model(tmp_path / "ft2", ft2)
    ms = ModelSet.from_dict(modelset({"ft1": tmp_path / "ft1"}, {"base": tmp_path / "base", "sibling": tmp_path / "ft2"}))
    (v,) = run_local(ms, tmp_path / "out")
    assert v["verdict"] == "derived" and v["parents"][0]["name"] == "base"
    gain = v["evidence"]["blend"]["median_gain"]
    assert 0.85 < gain < 1.0  # the sibling explains a little (correlated deltas), not a blend's worth


def test_a_fine_tune_audited_against_its_siblings_alone_gets_no_parent(tmp_path):
    """Three fine-tunes of one base: audited against the other two without the base, the first
    sits halfway between them (about 1/2 each in their blend, whatever their deltas' correlation),
    where a descendant of either would weigh about 1 on it: derived, with no parent named (the
    true one is not in the pool) and the closest still given. With the base in the pool, the base."""
    base, ft1, ft2, ft3, _ = family(3, tunes=3)
    for n, w in {"base": base, "ft1": ft1, "ft2": ft2, "ft3": ft3}.items():
        write_model(tmp_path / n, w)
    ms = ModelSet.from_dict(modelset({"ft1": tmp_path / "ft1"}, {"ft2": tmp_path / "ft2", "ft3": tmp_path / "ft3"}))
    (v,) = run_local(ms, tmp_path / "out")
    assert (v["verdict"], v["parents"]) == ("derived", [])
    assert v["closest"] in ("ft2", "ft3") and v["evidence"]["derived"]["parent_by"] == "none: between candidates"
    w = v["evidence"]["blend"]["weights"]
    assert abs(w["ft2"]["mean"] - 0.5) < 0.1 and abs(w["ft3"]["mean"] - 0.5) < 0.1
    assert "No parent is named" in v["explanation"]
    row = pq.read_table(tmp_path / "out" / "verdicts.parquet").to_pylist()[0]
    assert (row["verdict"], row["parents"], row["closest"]) == ("derived", [], v["closest"])
    rel = pq.read_table(tmp_path / "out" / "relations.parquet").to_pylist()
    assert {(r["other"], r["kind"]) for r in rel} == {("ft2", "related"), ("ft3", "related")}
    assert all(r["z"] > 6 and abs(r["weight"] - 0.5) < 0.1 for r in rel)
    ms = ModelSet.from_dict(
        modelset({"ft1": tmp_path / "ft1"}, {"base": tmp_path / "base", "ft2": tmp_path / "ft2", "ft3": tmp_path / "ft3"})
    )
    (v,) = run_local(ms, tmp_path / "out-with-base")
    assert v["verdict"] == "derived" and [p["name"] for p in v["parents"]] == ["base"]
    assert v["evidence"]["derived"]["parent_by"] == "closest"


def test_blend_with_an_alias_candidate(tmp_path):
    base, ft1, _, _ = family(1)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "base-reupload", {f"model.{k}": v for k, v in base.items()}, shards=2)
    write_model(tmp_path / "ft1", ft1)
    rio = {k: (0.3 * ft1[k] + 0.7 * base[k]).to(torch.bfloat16) for k in base}
    write_model(tmp_path / "rio", rio)
    ms = ModelSet.from_dict(
        modelset(
            {"rio": tmp_path / "rio"},
            {"base": tmp_path / "base", "ft1": tmp_path / "ft1", "base-reupload": tmp_path / "base-reupload"},
        )
    )
    (v,) = run_local(ms, tmp_path / "out")
    assert v["verdict"] == "blend"
    w = {p["name"]: p["weight"] for p in v["parents"]}
    assert set(w) == {"base", "ft1"} and abs(w["ft1"] - 0.3) < 0.01
    assert v["aliases"] == {"base": ["base-reupload"]}


def test_unrelated_and_nonfinite_rows(tmp_path):
    base, _, _, rnd = family(2)
    other = {k: rnd(v.shape) / 8 for k, v in base.items()}
    other["layers.0.q_proj.weight"][0, 0] = float("nan")
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "other", other)
    ms = ModelSet.from_dict(modelset({"other": tmp_path / "other"}, {"base": tmp_path / "base"}))
    (v,) = run_local(ms, tmp_path / "out")
    assert v["verdict"] == "unrelated"
    assert v["coverage"]["skipped"] == {"error: non-finite values": 1}
    assert v["coverage"]["tensors_compared"] == len(SHAPES) - 1


def test_demo_builds_deterministically(tmp_path):
    from lineage.demo import ensure

    a, b = ensure(tmp_path / "a"), ensure(tmp_path / "b")
    for f in sorted(p.relative_to(a) for p in a.rglob("*.safetensors")):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_task_arithmetic_names_its_base(tmp_path):
    """s = base + 0.7 (ft1 - base) + 0.5 (ft2 - base): a blend whose base weight is -0.2."""
    base, ft1, ft2, _ = family(3)
    ta = {k: (base[k] + 0.7 * (ft1[k] - base[k]) + 0.5 * (ft2[k] - base[k])).to(torch.bfloat16) for k in base}
    for name, m in (("base", base), ("ft1", ft1), ("ft2", ft2), ("ta", ta)):
        write_model(tmp_path / name, m)
    ms = ModelSet.from_dict(
        modelset({"ta": tmp_path / "ta"}, {"base": tmp_path / "base", "ft1": tmp_path / "ft1", "ft2": tmp_path / "ft2"})
    )
    (v,) = run_local(ms, tmp_path / "out")
    assert (v["verdict"], v["method"], v["base"]) == ("blend", "task_arithmetic", "base")
    w = {p["name"]: p["weight"] for p in v["parents"]}
    assert abs(w["ft1"] - 0.7) < 0.02 and abs(w["ft2"] - 0.5) < 0.02 and set(w) == {"ft1", "ft2"}
