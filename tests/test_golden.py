"""Behaviour pinned against stored outputs (tests/golden.py): the demo audit's
verdict and every Parquet row are what the code produced before the verdict
was redesigned; the evaluation set's verdicts are compared in test_evalset."""

from __future__ import annotations

from lineage.audit import run_local
from tests.golden import load, rows_snapshot, same
from tests.test_resume import demo_set


def test_demo_verdict_and_rows_unchanged(demo_root, tmp_path):
    (v,) = run_local(demo_set(demo_root), tmp_path / "demo")
    assert same(v, load("demo_verdict.json")) == []
    assert same(rows_snapshot(tmp_path / "demo"), load("demo_rows.json")) == []
