"""Cluster behaviour for real: ray job submit against a head we start, GPU
scheduling with logical GPUs, a worker killed mid-unit, a node removed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import pytest

from jobs.audit import run
from tests.common import kill_matching
from tests.test_pipeline import settings

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow  # starts Ray clusters and subprocesses: `make test-all`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    # the head, its workers and the job's `python` are this environment's
    e = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    e.pop("RAY_ADDRESS", None)
    return e


def dataset_counts(out: Path) -> tuple[int, int]:
    q = f"select count(*), count(distinct tensor) from read_parquet('{out}/tensors/**/*.parquet')"
    return duckdb.connect().execute(q).fetchone()


@pytest.fixture
def head():
    """`ray start --head` on loopback with 2 logical GPUs, in a private temp dir."""
    tmp = tempfile.mkdtemp(prefix="/tmp/rjh")
    port, dash = free_port(), free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=2", f"--temp-dir={tmp}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env={**env(), "TMPDIR": tmp}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env(), capture_output=True)
            if r.returncode == 0:
                break
            time.sleep(1)
        else:
            pytest.fail("ray head did not come up")
        yield address
    finally:
        proc.terminate()
        kill_matching(tmp)


def test_ray_job_submit_with_gpu_actors(head, demo_root, tmp_path):
    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head, "--working-dir", str(REPO), "--",
           "python", "-m", "jobs.audit", "compute=gpu", f"output_dir={out}", f"demo_cache={demo_root.parent}"]  # fmt: skip
    for _ in range(10):  # the head's job agent may come up a little after `ray job list` answers
        r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        log = r.stdout + r.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(2)
    assert r.returncode == 0 and "succeeded" in log, log[-3000:]
    # two actors, each holding one of the head's two logical GPUs; no CUDA here, so they fit on CPU
    line = next(x for x in log.splitlines() if "fit actors" in x)
    assert "2 fit actors, 1 GPU each" in line and sorted(line.count(f"gpu {i} -> cpu") for i in (0, 1)) == [1, 1]
    v = json.loads((out / "verdicts" / "rio-mini.json").read_text())
    assert v["verdict"] == "blend" and abs(v["parents"][0]["weight"] - 0.57) < 0.01
    assert dataset_counts(out) == (55, 55)


def test_worker_killed_mid_unit(ray_session, demo_root, tmp_path):
    """SIGKILL a worker while it runs a unit: Ray retries the unit, every tensor is written once."""
    killed = []

    def killer() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            r = subprocess.run(["pgrep", "-f", "^ray::fit_unit"], capture_output=True, text=True)
            pids = [int(p) for p in r.stdout.split()]
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = tmp_path / "out"
    (v,) = run(settings([f"output_dir={out}", f"demo_cache={demo_root.parent}", "fit.chunk_mb=0.002", "plan.unit_mb=2"]))
    t.join(5)
    assert killed, "no worker was running a unit to kill"
    assert v["verdict"] == "blend"
    assert dataset_counts(out) == (55, 55)


def test_node_removed_mid_run(demo_root, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "tests.node_loss", str(demo_root.parent), str(out)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["verdict"] == "blend" and res["alive_nodes"] == 2
    assert 0 < res["removed"]["at_parts"] < 55, res
    assert dataset_counts(out) == (55, 55)
