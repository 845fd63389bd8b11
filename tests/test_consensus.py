"""What a sparse merge did with the deltas it kept (explain/consensus.py).

A DARE merge that elects signs (dare_ties) is told from one that adds every kept delta
(dare_linear), by fitting the suspect where the parents' deltas from the base disagree in sign
and where they agree; the recipe names the method, and for dare_ties takes its weights from where
the signs agree. DARE scales each parent's kept delta by one factor (weight / density): a DARE
merge whose weights differ from its density is still DARE (its kept deltas land on no parent's
value), with its density read from the factors. TIES-style merges that drop by magnitude
(TIES, breadcrumbs) are told apart by whether they elect signs, divide by the weights kept
(`normalize`) and drop the largest deltas too (breadcrumbs' gamma), and their weights and
densities are read exactly. (DELLA, named by its dropped-delta energy, and mergekit's own merges
of every sparse method are in tests/test_certify.py and benchmarks/evalset.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from benchmarks.evalset import init_llama, save
from benchmarks.sparse_merges import dare, make, trimmed
from lineage.audit import run_local
from lineage.modelset import ModelSet


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


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.6, 0.4), (0.6, 0.3)])
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
        assert "signs were elected" in v["explanation"]
    saved = json.loads((tmp_path / "out" / "verdicts" / "suspect.json").read_text())
    assert saved["evidence"]["sparse"]["sign_election"] == e


@pytest.mark.parametrize(
    ("elect", "normalize", "gamma", "method", "family"),
    [
        (True, True, 0.0, "ties", "ties"),
        (True, False, 0.0, "ties", "ties"),  # TIES with normalize: false
        (False, False, 0.02, "breadcrumbs", "breadcrumbs"),
        (True, False, 0.02, "breadcrumbs_ties", "breadcrumbs"),
    ],
)
def test_magnitude_merges_are_named_with_their_parameters(tmp_path, elect, normalize, gamma, method, family):
    """Weights 0.6 / 0.3, density 0.4: the recipe gives them exactly, with gamma, the election
    (the method) and `normalize` where it differs from the method's default."""
    v, paths = _audit(tmp_path, lambda base, tunes: trimmed(base, tunes, [0.6, 0.3], 0.4, gamma, elect, normalize))
    assert (v["verdict"], v["merge_family"], v["base"]) == ("blend", family, "base"), v["explanation"]
    kept = v["evidence"]["sparse"]["kept_deltas"]
    assert (kept["elected"], kept["normalized"], kept["magnitude"]) == (elect, normalize, True), kept
    recipe = yaml.safe_load((tmp_path / "out" / v["recipe"]).read_text())
    assert recipe["merge_method"] == method
    default = method == "ties"
    assert (recipe.get("parameters") or {}).get("normalize", default) is normalize, recipe
    got = {m["model"]: m["parameters"] for m in recipe["models"]}
    for n, w in (("ft1", 0.6), ("ft2", 0.3)):
        want = w / 0.9 if normalize else w  # normalised: only the weights' shares matter, written as such
        assert got[str(paths[n])]["weight"] == pytest.approx(want, abs=0.002), recipe
        assert got[str(paths[n])]["density"] == 0.4, recipe
        assert got[str(paths[n])].get("gamma", 0.0) == pytest.approx(gamma, abs=0.002), recipe


@pytest.mark.parametrize(
    ("method", "density", "weights"),
    [("dare_ties", 0.2, (1.0, 1.0)), ("della", 0.2, (0.5, 0.5)), ("ties", 0.8, (0.7, 0.3)), ("della_linear", 0.8, (0.7, 0.3))],
)
def test_sparse_merges_at_low_and_high_density(tmp_path, method, density, weights):
    """At density 0.2 the drops leave a linear fit 0.9 of the residual or more (`derived`, by the
    fit alone), at 0.8 few elements keep the base's value (a dense blend, by the fit alone):
    element by element, both are sparse merges, named with their method and density."""
    v, paths = _audit(tmp_path, lambda base, tunes: make(method, base, tunes, list(weights), density))
    assert v["verdict"] == "blend", v["explanation"]
    assert "Element by element it is a sparse merge" in v["explanation"]
    recipe = yaml.safe_load((tmp_path / "out" / v["recipe"]).read_text())
    assert recipe["merge_method"] == method, recipe
    assert all(m["parameters"]["density"] == pytest.approx(density, abs=0.05) for m in recipe["models"]), recipe
    shares = {m["model"]: m["parameters"]["weight"] for m in recipe["models"]}
    total = 1.0 if method in ("ties", "della") else sum(weights)  # normalised: the weights' shares
    for n, w in zip(("ft1", "ft2"), weights):
        assert shares[str(paths[n])] == pytest.approx(w * total / sum(weights), abs=0.03), recipe


@pytest.mark.parametrize("method", ["ties", "dare_ties", "sibling"])
def test_a_sparse_merge_audited_without_its_base(tmp_path, method):
    """Audited against its two parents only, a TIES merge (and DARE at weight = density) still
    coincides with each parent where only that parent's delta was kept: a blend on a base not
    among the candidates, with no recipe (mergekit needs the base). A third fine-tune of the same
    base, audited against the other two, coincides with neither and is no blend."""
    base = init_llama(0)
    g = torch.Generator().manual_seed(1)
    tunes = [{k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    paths = {"ft1": save(tmp_path / "ft1", tunes[0]), "ft2": save(tmp_path / "ft2", tunes[1])}
    made = tunes[2] if method == "sibling" else make(method, base, tunes[:2], [0.5, 0.5], 0.5)
    suspect = save(tmp_path / "suspect", {k: v.to(torch.bfloat16) for k, v in made.items()})
    ms = ModelSet.from_dict(
        {
            "name": "d",
            "suspects": [{"name": "suspect", "source": str(suspect)}],
            "candidates": [{"name": n, "source": str(p)} for n, p in paths.items()],
        }
    )
    (v,) = run_local(ms, tmp_path / "out")
    if method == "sibling":
        assert v["verdict"] != "blend", v["explanation"]
        return
    assert (v["verdict"], v["merge_family"], v["base"]) == ("blend", "ties/dare", None), v["explanation"]
    assert {p["name"]: round(p["weight"], 2) for p in v["parents"]} == {"ft1": 0.5, "ft2": 0.5}
    assert "not among the candidates" in v["explanation"] and not v.get("recipe")
