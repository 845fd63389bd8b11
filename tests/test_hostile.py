"""Broken inputs met during an audit: clear errors, nothing lost."""

from __future__ import annotations

import pytest
import torch

from lineage.audit import Reducer, decide_all, plan_audit
from lineage.errors import LineageError
from lineage.modelset import ModelSet
from lineage.options import FitOptions
from lineage.output import read_rows
from lineage.source import resolve
from lineage.work import run_unit
from tests.common import local_runner, modelset, write_model


def test_duplicate_names_and_bad_members():
    with pytest.raises(LineageError, match="duplicate name 'a'"):
        ModelSet.from_dict(modelset({"a": "/x"}, {"a": "/y"}))
    with pytest.raises(LineageError, match="unknown keys \\['sorce'\\]"):
        ModelSet.from_dict(
            {"name": "m", "suspects": [{"name": "s", "sorce": "/x"}], "candidates": [{"name": "c", "source": "/y"}]}
        )
    with pytest.raises(LineageError, match="several candidates marked base"):
        ModelSet.from_dict(
            modelset({"s": "/x"}, {"a": "/y", "b": "/z"})
            | {"candidates": [{"name": "a", "source": "/y", "base": True}, {"name": "b", "source": "/z", "base": True}]}
        )
    with pytest.raises(LineageError, match="name 'a/b' must be letters"):
        ModelSet.from_dict(modelset({"a/b": "/x"}, {"c": "/y"}))


def test_unreadable_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").mkdir()  # not a readable file, even for root
    with pytest.raises(LineageError, match="model.safetensors: safetensors file is a directory, not a regular file"):
        resolve("m", str(tmp_path / "m"))


def test_file_truncated_after_planning_becomes_error_rows(tmp_path):
    """A shard that loses its tail mid-audit: every tensor of that shard becomes an
    `error` row naming file and tensor (its planned offsets no longer describe it);
    every other tensor is still written."""
    g = torch.Generator().manual_seed(0)
    cand = {f"w{i}": torch.randn(64, 64, generator=g) for i in range(6)}
    sus = {k: v + 0.01 * torch.randn(64, 64, generator=g) for k, v in cand.items()}
    write_model(tmp_path / "c", cand)
    write_model(tmp_path / "s", sus, shards=2)  # w0, w2, w4 in the first shard
    ms = ModelSet.from_dict(modelset({"s": tmp_path / "s"}, {"c": tmp_path / "c"}))
    plan = plan_audit(ms).pack(1 << 30, min_units=3)
    f = tmp_path / "s" / "model-00002-of-00002.safetensors"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: -64 * 64 * 4 - 100])  # the last tensor, and a bit more, gone
    red = Reducer(plan, tmp_path / "out")
    for u in plan.units:
        red.add(run_unit(u, FitOptions(chunk_bytes=1 << 20)), u.uid)
    red.finish()
    (v,) = decide_all(plan, tmp_path / "out", local_runner(FitOptions()))
    rows = {r["tensor"]: r for r in read_rows(tmp_path / "out", "s")}
    errors = {k: r["reason"] for k, r in rows.items() if r["status"] == "error"}
    assert set(errors) == {"w1", "w3", "w5"}
    assert all(
        msg == f"{f} [{k}]: file changed since the audit was planned (size {size} -> {f.stat().st_size}); rerun to plan it again"
        for k, msg in errors.items()
    )
    assert sum(r["status"] == "ok" for r in rows.values()) == 3
    assert v["verdict"] == "derived"
    assert v["coverage"]["skipped"] == {
        "error: file changed since the audit was planned (size N -> N); rerun to plan it again": 3
    }


def test_transient_read_error_is_retried(tmp_path):
    """A shard briefly missing (a sync replacing it) is retried, not lost; one
    that stays missing becomes an error naming the file and tensor."""
    import threading

    from lineage.align import align
    from lineage.engines import accumulate
    from lineage.reader import Reader

    write_model(tmp_path / "s", {"w": torch.randn(32, 32)})
    write_model(tmp_path / "c", {"w": torch.randn(32, 32)})
    (g,) = align(resolve("s", str(tmp_path / "s")), [resolve("c", str(tmp_path / "c"))])[0]
    f = tmp_path / "c" / "model.safetensors"
    away = tmp_path / "elsewhere"
    f.rename(away)
    threading.Timer(0.3, lambda: away.rename(f)).start()
    with Reader(retries=3, backoff_s=0.2) as r:
        st = accumulate(g, r, FitOptions(chunk_bytes=1 << 20))
        assert st.n == 32 * 32 and r.retried >= 1
    f.rename(away)
    with (
        Reader(retries=1, backoff_s=0.01) as r,
        pytest.raises(LineageError, match=r"model.safetensors \[w\]: read failed after 2 attempts"),
    ):
        accumulate(g, r, FitOptions(chunk_bytes=1 << 20))
