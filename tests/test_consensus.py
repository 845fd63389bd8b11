"""What a DARE or DELLA merge did with the deltas it kept (explain/consensus.py).

A DARE merge that elects signs (dare_ties) is told from one that adds every kept delta
(dare_linear), by fitting the suspect where the parents' deltas from the base disagree in sign
and where they agree; the recipe names the method, and for dare_ties takes its weights from where
the signs agree. DARE scales each parent's kept delta by one factor (weight / density): a DARE
merge whose weights differ from its density is still DARE (its kept deltas land on no parent's
value), with its density read from the factors. (DELLA, named by its dropped-delta energy, is
judged on mergekit's own merges in benchmarks/evalset.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from benchmarks.evalset import init_llama, save
from lineage.audit import run_local
from lineage.modelset import ModelSet


def dare(base: dict, tunes: list[dict], weights: list[float], density: float, elect: bool, seed: int) -> dict:
    """DARE as its paper and mergekit define it: each delta kept at random with probability
    `density` and rescaled by 1 / density; with `elect`, only the deltas whose sign agrees with
    their weighted sum's are added (TIES' election, as dare_ties)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, b in base.items():
        d = torch.stack([w * (t[k] - b) * (torch.rand(b.shape, generator=g) < density) / density for t, w in zip(tunes, weights)])
        if elect:
            d = d * (torch.sign(d) == torch.where(d.sum(0) >= 0, 1.0, -1.0))
        out[k] = (b + d.sum(0)).to(torch.bfloat16)
    return out


def _audit(tmp_path, make) -> tuple[dict, dict]:
    """A base, two fine-tunes and the suspect `make(base, tunes)`, audited with the base declared."""
    base = init_llama(0)
    g = torch.Generator().manual_seed(1)
    tunes = [{k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    paths = {
        "base": save(tmp_path / "base", base),
        "ft1": save(tmp_path / "ft1", tunes[0]),
        "ft2": save(tmp_path / "ft2", tunes[1]),
    }
    suspect = save(tmp_path / "suspect", make(base, tunes))
    ms = ModelSet.from_dict(
        {
            "name": "d",
            "suspects": [{"name": "suspect", "source": str(suspect)}],
            "candidates": [{"name": n, "source": str(p), "base": n == "base"} for n, p in paths.items()],
        }
    )
    (v,) = run_local(ms, tmp_path / "out")
    return v, paths


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.6, 0.4)])
@pytest.mark.parametrize("elect", [True, False])
def test_dare_with_and_without_sign_election(tmp_path, elect, weights):
    """At weights 0.5 / 0.5 and density 0.5 a delta kept alone lands on its parent's value; at
    0.6 / 0.4 on 1.2 and 0.8 times its delta, which only the one factor per parent tells from DELLA."""
    v, paths = _audit(tmp_path, lambda base, tunes: dare(base, tunes, list(weights), 0.5, elect, seed=2))
    assert (v["verdict"], v["merge_family"], v["base"]) == ("blend", "dare", "base")
    scales = v["evidence"]["sparse"]["kept_scale"]
    for n, w in zip(("ft1", "ft2"), weights):
        assert scales[n]["scale"] == pytest.approx(w / 0.5, abs=0.01), scales
    e = v["evidence"]["sparse"]["sign_election"]
    assert e["elected"] is elect, e
    assert e["tensors"] > 10 and e["conflict_elements"] > 50000
    recipe = yaml.safe_load((tmp_path / "out" / v["recipe"]).read_text())
    assert recipe["merge_method"] == ("dare_ties" if elect else "dare_linear")
    w = {m["model"]: m["parameters"]["weight"] for m in recipe["models"]}
    assert w[str(paths["ft1"])] == pytest.approx(weights[0], abs=0.02) and w[str(paths["ft2"])] == pytest.approx(
        weights[1], abs=0.02
    )
    assert all(m["parameters"]["density"] == pytest.approx(0.5, abs=0.02) for m in recipe["models"]), recipe
    if elect:  # where signs conflict the surviving delta weighs more: the whole-tensor projection is off
        assert e["weights_where_signs_conflict"]["ft1"] > e["weights_where_signs_agree"]["ft1"] + 0.03
        assert "sign election" in v["explanation"]
    saved = json.loads((tmp_path / "out" / "verdicts" / "suspect.json").read_text())
    assert saved["evidence"]["sparse"]["sign_election"] == e
