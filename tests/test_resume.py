"""A driver killed mid-run and restarted with the same output_dir resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from lineage.audit import Reducer, plan_audit, run_local
from lineage.errors import LineageError
from lineage.modelset import ModelSet
from lineage.options import FitOptions
from lineage.work import run_unit
from tests.common import modelset

REPO = Path(__file__).resolve().parent.parent
COLS = "tensor, status, reason, elements, stats_gram, stats_exact, blend, candidates"


def dataset(out: Path) -> list[tuple]:
    q = f"select {COLS} from read_parquet('{out}/tensors/**/*.parquet') order by tensor"
    return duckdb.connect().execute(q).fetchall()


def demo_set(root: Path) -> ModelSet:
    return ModelSet.from_dict(
        modelset(
            {"rio-mini": root / "rio-mini"},
            {"qwen-mini": root / "qwen-mini", "nex-mini": root / "nex-mini"},
            base="qwen-mini",
            name="demo",
        )
    )


def test_resume_recomputes_only_missing_tensors(demo_root, tmp_path):
    ms = demo_set(demo_root)
    full = run_local(ms, tmp_path / "full")
    # a run that dies after two of its units: rows flushed one at a time, then nothing more
    plan = plan_audit(ms)
    plan.resume_from(tmp_path / "crash")
    plan.pack(1 << 30, min_units=8)
    red = Reducer(plan, tmp_path / "crash", flush_rows=1)
    for u in plan.units[:2]:
        red.add(run_unit(u, FitOptions(base=ms.base)), u.uid)
    red.writer.close()
    written = len(dataset(tmp_path / "crash"))
    assert 0 < written < 55

    again = plan_audit(ms)
    assert again.resume_from(tmp_path / "crash") == written
    again.pack(1 << 30, min_units=8)
    assert sum(len(u.items) for u in again.units) == sum(1 for g in again.groups if g.status == "ok") - written
    resumed = run_local(ms, tmp_path / "crash")
    assert dataset(tmp_path / "crash") == dataset(tmp_path / "full")
    assert resumed[0]["parents"] == full[0]["parents"]


def test_other_audit_in_output_dir_is_refused(demo_root, tmp_path):
    run_local(demo_set(demo_root), tmp_path / "o")
    other = ModelSet.from_dict(
        modelset({"rio-mini": demo_root / "rio-mini"}, {"qwen-mini": demo_root / "qwen-mini"}, name="demo")
    )
    with pytest.raises(LineageError, match="holds the results of a different audit"):
        run_local(other, tmp_path / "o")


@pytest.mark.slow
def test_killed_driver_resumes(demo_root, tmp_path):
    """SIGKILL the real job once rows are on disk; the rerun completes the same dataset."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    chunk_mb = 0.002  # slow enough to be killed mid-run
    args = [
        sys.executable,
        "-m",
        "jobs.audit",
        f"demo_cache={demo_root.parent}",
        "write.flush_rows=1",
        "compute.num_cpus=1",
        f"fit.chunk_mb={chunk_mb}",
    ]
    out = tmp_path / "killed"
    p = subprocess.Popen(
        [*args, f"output_dir={out}", "fit.chunk_mb=0.002"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and len(list(out.glob("tensors/*/part-*.parquet"))) < 20:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    before = len(dataset(out))
    r = subprocess.run([*args, f"output_dir={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"resuming: {before} of 55 tensors" in r.stdout
    assert 0 < before < 55, "the first run finished before it could be killed"
    full = tmp_path / "full"
    run_local(demo_set(demo_root), full, FitOptions(chunk_bytes=int(chunk_mb * (1 << 20))))
    assert dataset(out) == dataset(full)


def test_sampled_audit_same_verdict_wider_intervals(demo_root, tmp_path):
    """fit.sample_fraction: same class and weights within 0.01 of the full audit;
    per-tensor standard errors grow as fewer elements are read."""
    (full,) = run_local(demo_set(demo_root), tmp_path / "full")
    (part,) = run_local(demo_set(demo_root), tmp_path / "part", FitOptions(sample_fraction=0.1))
    assert part["verdict"] == full["verdict"] == "blend"
    for pf, pp in zip(full["parents"], part["parents"]):
        assert pf["name"] == pp["name"] and abs(pf["weight"] - pp["weight"]) < 0.01
        assert pp["ci95"][1] - pp["ci95"][0] >= pf["ci95"][1] - pf["ci95"][0]
    assert part["coverage"]["bytes_compared"] < 0.5 * full["coverage"]["bytes_compared"]
    q = "select tensor, elements, b.se from (select tensor, elements, unnest(blend) as b from read_parquet('{}/tensors/**/*.parquet') where component = 'expert') where b.candidate = 'nex-mini' order by tensor"
    con = duckdb.connect()
    for (t, nf, sef), (_, np_, sep) in zip(
        con.execute(q.format(tmp_path / "full")).fetchall(), con.execute(q.format(tmp_path / "part")).fetchall()
    ):
        assert np_ < nf and sep > sef, t
