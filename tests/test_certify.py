"""`lineage certify`: the recovered recipe, rerun with real mergekit, reproduces the suspect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def audit(root: Path, suspect: Path, cands: dict[str, Path]) -> Path:
    ms = ModelSet.from_dict(
        {
            "name": "c",
            "suspects": [{"name": "suspect", "source": str(suspect)}],
            "candidates": [{"name": n, "source": str(p)} for n, p in cands.items()],
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
