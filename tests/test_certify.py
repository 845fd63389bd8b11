"""`lineage certify`: the recovered recipe, rerun with real mergekit, reproduces the suspect."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.evalset import LLAMA, init_llama, save
from benchmarks.wild import gradient
from lineage.audit import run_local
from lineage.layout import layer_index
from lineage.modelset import ModelSet

pytest.importorskip("mergekit")  # installed by `make test-all` (the `merge` extra), as CI runs it
pytestmark = pytest.mark.slow

LINEAGE = str(Path(sys.executable).parent / "lineage")


def family(root: Path) -> tuple[dict[str, Path], dict, dict]:
    """A base and two fine-tune-like children (the base plus 5% noise each), Llama-shaped."""
    base = init_llama(0)
    g = torch.Generator().manual_seed(1)
    kids = {n: {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) for k, v in base.items()} for n in ("a", "b")}
    return {"base": save(root / "base", base)} | {n: save(root / n, w) for n, w in kids.items()}, base, kids


def audit(root: Path, suspect: Path, cands: dict[str, Path], declared: str | None = None) -> Path:
    ms = ModelSet.from_dict(
        {
            "name": "c",
            "suspects": [{"name": "suspect", "source": str(suspect)}],
            "candidates": [{"name": n, "source": str(p), "base": n == declared} for n, p in cands.items()],
        }
    )
    run_local(ms, root / "out")
    return root / "out"


def test_a_scheduled_linear_merge_is_reproduced_by_its_recipe(tmp_path):
    paths, base, kids = family(tmp_path / "models")

    def w(k: str) -> float:
        return gradient([0.2, 0.8], layer_index(k), LLAMA["layers"])

    merged = {k: (w(k) * kids["a"][k] + (1 - w(k)) * kids["b"][k]).to(torch.bfloat16) for k in base}
    out = audit(tmp_path, save(tmp_path / "models" / "suspect", merged), paths)
    v = json.loads((out / "verdicts" / "suspect.json").read_text())
    assert (v["verdict"], v["method"], v["recipe"]) == ("blend", "linear", "verdicts/suspect.recipe.yaml")
    r = subprocess.run([LINEAGE, "certify", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "suspect: linear:" in r.stdout
    cert = json.loads((out / "verdicts" / "suspect.json").read_text())["certificate"]
    assert cert == json.loads((out / "verdicts" / "suspect.certificate.json").read_text())
    assert cert["exact"] and cert["within_storage_rounding"] == cert["tensors"] == len(base)
    assert cert["max_rel_dist"] < 2**-8 and (out / cert["rerun"]).is_dir()
    # the same rerun as Ray tasks, one layer each (the gradient's value given per layer): the same certificate
    r = subprocess.run([LINEAGE, "certify", str(out), "--layers-per-task", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr + r.stdout
    ranged = json.loads((out / "verdicts" / "suspect.json").read_text())["certificate"]
    assert ranged["ranges"] == [[i, i + 1] for i in range(LLAMA["layers"])]
    assert ranged["exact"] and ranged["within_storage_rounding"] == ranged["tensors"] == len(base)
    assert abs(ranged["max_rel_dist"] - cert["max_rel_dist"]) < 1e-12


def test_a_recipe_that_does_not_reproduce_says_so(tmp_path):
    """A merge with noise added afterwards: the recipe's rerun lacks the noise, and the
    certificate names the tensors it misses rather than claiming a reconstruction."""
    paths, base, kids = family(tmp_path / "models")
    g = torch.Generator().manual_seed(9)
    merged = {}
    for k in base:
        m = 0.6 * kids["a"][k] + 0.4 * kids["b"][k]
        merged[k] = (m + 0.02 * m.std() * torch.randn(m.shape, generator=g)).to(torch.bfloat16)
    out = audit(tmp_path, save(tmp_path / "models" / "suspect", merged), paths)
    v = json.loads((out / "verdicts" / "suspect.json").read_text())
    assert v["verdict"] == "blend"
    r = subprocess.run([LINEAGE, "certify", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cert = json.loads((out / "verdicts" / "suspect.json").read_text())["certificate"]
    assert not cert["exact"] and cert["within_storage_rounding"] < cert["tensors"]
    assert cert["worst"] and cert["max_rel_dist"] > 0.01


def test_a_dare_merge_is_certified_in_distribution(tmp_path):
    """DARE's random masks cannot be replayed: the rerun is another draw. The certificate then
    compares what can be compared: per tensor, the fraction of elements moved from the base and
    the RMS of the move, in the suspect and in the rerun. Made by mergekit itself (dare_linear)."""
    paths, base, _ = family(tmp_path / "models")
    cfg = tmp_path / "dare.yaml"
    cfg.write_text(
        f"merge_method: dare_linear\nbase_model: {paths['base']}\nmodels:\n"
        f"  - model: {paths['a']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {paths['b']}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n"
    )
    made = tmp_path / "models" / "suspect"
    exe = str(Path(sys.executable).parent / "mergekit-yaml")
    r = subprocess.run([exe, str(cfg), str(made), "--no-copy-tokenizer"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = audit(tmp_path, made, paths)
    v = json.loads((out / "verdicts" / "suspect.json").read_text())
    assert v["verdict"] == "blend" and v["merge_family"] == "dare"
    assert v["evidence"]["sparse"]["sign_election"]["elected"] is not True  # dare_linear elects no signs
    r = subprocess.run([LINEAGE, "certify", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cert = json.loads((out / "verdicts" / "suspect.json").read_text())["certificate"]
    assert not cert["replayable"] and not cert["exact"]
    d = cert["distribution"]
    assert d["tensors"] == len(base) and d["consistent"] == d["tensors"], d
    assert abs(d["median_kept_frac"] - 0.75) < 0.05  # kept unless both deltas were dropped: 1 - (1 - 0.5)^2
    assert "in distribution it matches on" in cert["note"]
    # the density the recipe ends with (estimated, then calibrated by a rerun if that one did not match)
    final = (cert.get("density_calibrated") or {}).get("to") or yaml.safe_load((out / v["recipe"]).read_text())["models"][0][
        "parameters"
    ]["density"]
    assert abs(final - 0.5) <= 0.04


def test_an_sce_merge_is_named_and_its_recipe_reproduces_it(tmp_path):
    """SCE (mergekit's `sce`) drops one mask for every parent, the elements where the parents
    agree most, and renormalises the rest by the deltas' energy: the base keeps a share of the
    linear fit, which names it SCE. Its rerun is deterministic, so the certificate is exact."""
    paths, base, _ = family(tmp_path / "models")
    made = mergekit(
        tmp_path,
        f"merge_method: sce\nbase_model: {paths['base']}\nmodels:\n  - model: {paths['a']}\n  - model: {paths['b']}\n"
        "parameters: {select_topk: 0.5}\ndtype: bfloat16\n",
    )
    out = audit(tmp_path, made, paths)
    v = json.loads((out / "verdicts" / "suspect.json").read_text())
    assert (v["verdict"], v["merge_family"], v["base"]) == ("blend", "sce", "base")
    assert {p["name"] for p in v["parents"]} == {"a", "b"}
    recipe = yaml.safe_load((out / v["recipe"]).read_text())
    assert (recipe["merge_method"], recipe["parameters"]) == ("sce", {"select_topk": 0.5})
    r = subprocess.run([LINEAGE, "certify", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cert = json.loads((out / "verdicts" / "suspect.json").read_text())["certificate"]
    assert cert["replayable"] and cert["exact"] and cert["within_storage_rounding"] == cert["tensors"] == len(base)


def test_task_negation_is_written_on_the_declared_base(tmp_path):
    """base + (a - base) - 0.5 (b - base): in affine weights a 1, b -0.5, base 0.5. With base declared
    the recipe is the one that was run (a negative task weight), and it reruns exactly."""
    paths, base, _ = family(tmp_path / "models")
    made = mergekit(
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {paths['base']}\nmodels:\n  - model: {paths['a']}\n"
        f"    parameters: {{weight: 1.0}}\n  - model: {paths['b']}\n    parameters: {{weight: -0.5}}\ndtype: bfloat16\n",
    )
    out = audit(tmp_path, made, paths, declared="base")
    v = json.loads((out / "verdicts" / "suspect.json").read_text())
    assert (v["verdict"], v["method"], v["base"]) == ("blend", "task_arithmetic", "base")
    w = {p["name"]: p["weight"] for p in v["parents"]}
    assert set(w) == {"a", "b"} and abs(w["a"] - 1) < 0.01 and abs(w["b"] + 0.5) < 0.01
    assert re.search(r"- 0\.(49|50)\d x \(b - base\)", v["explanation"]), v["explanation"]
    r = subprocess.run([LINEAGE, "certify", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cert = json.loads((out / "verdicts" / "suspect.json").read_text())["certificate"]
    assert cert["exact"] and cert["within_storage_rounding"] == cert["tensors"] == len(base)


def test_a_linear_merge_with_unnormalised_weights_is_fitted_with_free_weights(tmp_path):
    """mergekit linear with normalize: false and weights 0.6 / 0.6 scales the blend by 1.2, which
    no blend with weights summing to 1 explains: the free fit gives the weights, the recipe says
    normalize: false, and it reruns exactly."""
    paths, base, _ = family(tmp_path / "models")
    made = mergekit(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {paths['a']}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {paths['b']}\n    parameters: {{weight: 0.6}}\nparameters: {{normalize: false}}\ndtype: bfloat16\n",
    )
    out = audit(tmp_path, made, paths)
    v = json.loads((out / "verdicts" / "suspect.json").read_text())
    assert (v["verdict"], v["method"]) == ("blend", "linear")
    w = {p["name"]: p["weight"] for p in v["parents"]}
    assert set(w) == {"a", "b"} and all(abs(x - 0.6) < 0.01 for x in w.values())
    assert abs(v["evidence"]["blend"]["weights_sum"] - 1.2) < 0.01 and "sum to 1.200" in v["explanation"]
    assert yaml.safe_load((out / v["recipe"]).read_text())["parameters"] == {"normalize": False}
    r = subprocess.run([LINEAGE, "certify", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cert = json.loads((out / "verdicts" / "suspect.json").read_text())["certificate"]
    assert cert["exact"] and cert["within_storage_rounding"] == cert["tensors"] == len(base)


def mergekit(root: Path, config: str) -> Path:
    """A merge made by mergekit itself from `config`."""
    cfg, made = root / "merge.yaml", root / "models" / "suspect"
    cfg.write_text(config)
    exe = str(Path(sys.executable).parent / "mergekit-yaml")
    r = subprocess.run([exe, str(cfg), str(made), "--no-copy-tokenizer"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return made


def test_a_merge_of_hub_models_is_certified_from_the_hub(tmp_path, monkeypatch):
    """Parents and suspect on a (loopback) hub: the recipe names each parent at the commit the audit
    read, mergekit fetches them from the hub, and the suspect is downloaded to compare with."""
    import os

    import huggingface_hub.constants as c

    from tests.hubserver import Hub, hub_env

    paths, base, kids = family(tmp_path / "models")
    merged = {k: (0.7 * kids["a"][k] + 0.3 * kids["b"][k]).to(torch.bfloat16) for k in base}
    paths["suspect"] = save(tmp_path / "models" / "suspect", merged)
    with Hub() as hub:
        env = hub_env(hub, tmp_path / "hf-home")
        for k, val in env.items():
            monkeypatch.setenv(k, val)
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
        commits = {n: hub.repo(f"org/{n}").add_commit(p) for n, p in paths.items()}
        src = {n: f"hf://org/{n}" for n in paths}
        out = audit(tmp_path, src["suspect"], {n: src[n] for n in ("base", "a", "b")})  # type: ignore[arg-type]
        v = json.loads((out / "verdicts" / "suspect.json").read_text())
        assert (v["verdict"], v["method"]) == ("blend", "linear")
        recipe = yaml.safe_load((out / v["recipe"]).read_text())
        assert {m["model"] for m in recipe["models"]} == {f"org/a@{commits['a']}", f"org/b@{commits['b']}"}
        r = subprocess.run([LINEAGE, "certify", str(out)], capture_output=True, text=True, timeout=600, env={**os.environ, **env})
        assert r.returncode == 0, r.stderr + r.stdout
        cert = json.loads((out / "verdicts" / "suspect.json").read_text())["certificate"]
        assert cert["exact"] and cert["within_storage_rounding"] == cert["tensors"] == len(base), cert


@pytest.mark.parametrize(
    ("method", "params", "top"),
    [
        ("breadcrumbs_ties", "density: 0.4, gamma: 0.02", ""),
        ("ties", "density: 0.3", "parameters: {normalize: false}\n"),
    ],
)
def test_a_magnitude_merge_is_reproduced_exactly(tmp_path, method, params, top):
    """mergekit's TIES and breadcrumbs drop deltas by magnitude, deterministically: the recipe's
    method, weights, density, gamma and `normalize`, read from the kept deltas, rerun to the
    suspect's very bits."""
    paths, base, _ = family(tmp_path / "models")
    made = mergekit(
        tmp_path,
        f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n"
        f"  - model: {paths['a']}\n    parameters: {{weight: 0.6, {params}}}\n"
        f"  - model: {paths['b']}\n    parameters: {{weight: 0.3, {params}}}\n{top}dtype: bfloat16\n",
    )
    out = audit(tmp_path, made, paths, declared="base")
    v = json.loads((out / "verdicts" / "suspect.json").read_text())
    recipe = yaml.safe_load((out / v["recipe"]).read_text())
    assert recipe["merge_method"] == method, recipe
    assert (recipe.get("parameters") or {}).get("normalize", method == "ties") is (method == "ties" and not top), recipe
    r = subprocess.run([LINEAGE, "certify", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cert = json.loads((out / "verdicts" / "suspect.json").read_text())["certificate"]
    assert cert["replayable"] and cert["exact"] and cert["within_storage_rounding"] == cert["tensors"] == len(base), cert


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_is_told_from_della_linear(tmp_path, method):
    """DELLA elects signs and divides by the weights kept; della_linear adds every kept delta.
    Both draw random masks (no exact rerun): the recipe names the method, the weights (della's
    as their shares), the density and epsilon (from how a delta's kept rate rises with its
    magnitude rank)."""
    paths, _, _ = family(tmp_path / "models")
    made = mergekit(
        tmp_path,
        f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n"
        f"  - model: {paths['a']}\n    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}\n"
        f"  - model: {paths['b']}\n    parameters: {{weight: 0.3, density: 0.5, epsilon: 0.1}}\n"
        "parameters: {lambda: 1.0}\ndtype: bfloat16\n",
    )
    out = audit(tmp_path, made, paths, declared="base")
    v = json.loads((out / "verdicts" / "suspect.json").read_text())
    assert (v["verdict"], v["merge_family"]) == ("blend", "della"), v["explanation"]
    recipe = yaml.safe_load((out / v["recipe"]).read_text())
    assert recipe["merge_method"] == method, recipe
    w = {m["model"]: m["parameters"]["weight"] for m in recipe["models"]}
    if method == "della":  # shares, read from the added deltas: 0.655-0.664 for 2 / 3 over five runs of mergekit
        assert w[str(paths["a"])] == pytest.approx(2 / 3, abs=0.02) and w[str(paths["b"])] == pytest.approx(1 / 3, abs=0.02)
    else:  # the kept-alone factors over the rescale its keep rates give
        assert w[str(paths["a"])] == pytest.approx(0.6, abs=0.01) and w[str(paths["b"])] == pytest.approx(0.3, abs=0.01)
    assert recipe["parameters"]["epsilon"] == 0.1 and all(m["parameters"]["density"] == 0.5 for m in recipe["models"])
