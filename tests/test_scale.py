"""Planning at the real scale of Qwen3.5-397B-A17B, from manifests, without the bytes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lineage.align import align
from lineage.decode import decoded
from lineage.errors import LineageError
from lineage.manifest import load_manifest
from lineage.plan import imbalance, plan_units
from lineage.reader import Reader

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "manifests"
pytestmark = pytest.mark.skipif(not MANIFESTS.exists(), reason="../shared/manifests not present")


@pytest.fixture(scope="module")
def aligned():
    bf16 = load_manifest("qwen-bf16", MANIFESTS / "qwen3.5-397b-a17b-bf16.index.json.gz")
    fp8 = load_manifest("qwen-fp8", MANIFESTS / "qwen3.5-397b-a17b-fp8.index.json.gz")
    assert (len(bf16.tensors), len(fp8.tensors)) == (2924, 189042)
    return align(bf16, [fp8])


def test_fused_bf16_against_per_expert_fp8_aligns_everything(aligned):
    groups, unmatched = aligned
    assert Counter(g.status for g in groups) == {"ok": 2924}
    assert unmatched == {"qwen-fp8": []}  # every candidate tensor used (scales ride with their weights)
    g = next(g for g in groups if g.tensor == "model.language_model.layers.0.mlp.experts.gate_up_proj")
    side = g.paired[0].view
    assert len(side.segments) == 1024 and side.dtype == "F8_E4M3"
    assert all(s.scale is not None and s.scale.dtype == "F32" for s in side.segments)
    assert g.view.nbytes == 8 << 30


@pytest.mark.parametrize("workers", [64, 512])
def test_units_balanced_within_5_percent(aligned, workers):
    groups, _ = aligned
    units = plan_units(groups, unit_bytes=1 << 62, min_units=workers, max_item_bytes=64 << 20)
    assert len(units) == workers
    assert imbalance(units) < 0.05
    # the 8 GiB fused tensor is cut into row ranges spread over many units
    gid = next(i for i, g in enumerate(groups) if g.tensor.endswith("layers.0.mlp.experts.gate_up_proj"))
    parts = [(it.row0, it.row1, u.uid) for u in units for it in u.items if it.gid == gid]
    assert len(parts) >= 128 and len({p[2] for p in parts}) >= min(workers, 64)
    spans = sorted(p[:2] for p in parts)
    assert spans[0][0] == 0 and spans[-1][1] == 512 * 2048 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_manifest_bytes_cannot_be_read(aligned):
    groups, _ = aligned
    with Reader(retries=0) as r, pytest.raises(LineageError, match="manifest://"):
        decoded(r, groups[0].view, 0, 1)
