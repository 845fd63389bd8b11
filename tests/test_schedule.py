"""Schedules: blend weights per layer and component described as a merge configuration would set them."""

from __future__ import annotations

import random

import pytest

from benchmarks.wild import SLERP_ATTN, SLERP_MLP, gradient
from lineage.explain.schedule import schedule

LAYERS = 12


def points(weight, comps=("attention", "mlp"), per=3, jitter=0.0, seed=0):
    """(layer, component, weight, se, elements) for `per` matrices per layer and component."""
    rng = random.Random(seed)
    return [
        (layer, comp, weight(layer, comp) + rng.gauss(0.0, jitter), 1e-4, 1000.0)
        for layer in range(LAYERS)
        for comp in comps
        for _ in range(per)
    ] + [(None, "embedding", 0.3, 1e-4, 5000.0)]


def test_constant():
    s = schedule(points(lambda i, c: 0.57), LAYERS)
    assert (s["kind"], s["anchors"]) == ("constant", [0.57])
    assert s["within_sd"] == 0.0 and s["outside_stack"] == {"embedding": 0.3}


def test_mergekit_gradient_gives_its_anchors():
    s = schedule(points(lambda i, c: gradient([0.2, 0.8], i, LAYERS)), LAYERS)
    assert s["kind"] == "linear" and s["anchors"] == pytest.approx([0.2, 0.8], abs=1e-4)
    s = schedule(points(lambda i, c: gradient([0.1, 0.9, 0.4], i, LAYERS)), LAYERS)
    assert s["kind"] == "piecewise" and s["anchors"] == pytest.approx([0.1, 0.9, 0.4], abs=1e-4)


def test_the_slerp_recipe_is_one_schedule_per_component():
    s = schedule(points(lambda i, c: gradient(SLERP_ATTN if c == "attention" else SLERP_MLP, i, LAYERS)), LAYERS)
    assert s["kind"] == "per_component"
    assert s["components"]["attention"]["anchors"] == pytest.approx(SLERP_ATTN, abs=1e-4)
    assert s["components"]["mlp"]["anchors"] == pytest.approx(SLERP_MLP, abs=1e-4)
    assert s["per_layer"]["attention"]["0"] == 0.0 and s["per_layer"]["mlp"]["0"] == 1.0


def test_filters_give_constants_per_component():
    s = schedule(points(lambda i, c: 0.7 if c == "attention" else 0.3), LAYERS)
    assert s["kind"] == "per_component"
    assert {c: (p["kind"], p["anchors"]) for c, p in s["components"].items()} == {
        "attention": ("constant", [0.7]),
        "mlp": ("constant", [0.3]),
    }


def test_weights_scattered_within_a_layer_are_measured():
    """A sibling's projection weights scatter from one matrix to the next: within_sd says so."""
    s = schedule(points(lambda i, c: 0.5, jitter=0.2, seed=3), LAYERS)
    assert s["within_sd"] > 0.15
    assert schedule(points(lambda i, c: 0.5, jitter=0.005, seed=3), LAYERS)["within_sd"] < 0.01


def test_free_per_layer_values_are_not_forced_into_anchors():
    rng = random.Random(7)
    values = [rng.uniform(0, 1) for _ in range(LAYERS)]
    s = schedule(points(lambda i, c: values[i]), LAYERS)
    assert s["kind"] == "per_layer" and s["anchors"] is None
    assert [s["per_layer"]["attention"][str(i)] for i in range(LAYERS)] == pytest.approx(values, abs=1e-4)
