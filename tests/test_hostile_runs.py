"""Hostile runs: concurrent audits into one folder, Ctrl-C and SIGTERM, corrupted
results from an earlier run, a stale or dead Ray, work no node can schedule.
Real processes and real signals; every wait has a timeout far below a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest

from tests.test_hostile_inputs import one_error_line

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def env(**extra: str) -> dict:
    e = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", **extra}
    if "RAY_ADDRESS" not in extra:
        e.pop("RAY_ADDRESS", None)
    return e


def cmd(demo_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.audit",
        f"demo_cache={demo_root.parent}",
        f"output_dir={out}",
        "compute.num_cpus=1",
        *extra,
    ]


def counts(out: Path) -> tuple[int, int]:
    q = f"select count(*), count(distinct tensor) from read_parquet('{out}/tensors/**/*.parquet')"
    return duckdb.connect().execute(q).fetchone()


def parts(out: Path) -> list[Path]:
    return sorted(out.glob("tensors/*/part-*.parquet"))


def test_two_audits_into_one_folder(demo_root, tmp_path):
    """Started at the same moment: one audits, the other refuses at once naming the
    holder; with write.wait_for_lock the second waits, then finds everything written."""
    out = tmp_path / "o"
    slow = ("fit.chunk_mb=0.01", "write.flush_rows=5")
    a = subprocess.Popen(
        cmd(demo_root, out, *slow), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    b = subprocess.Popen(
        cmd(demo_root, out, *slow), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    (_, ae), (_, be) = a.communicate(timeout=300), b.communicate(timeout=300)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (ae[-2000:], be[-2000:])
    loser = ae if a.returncode == 2 else be
    assert "another audit is writing there (pid " in loser and "write.wait_for_lock=true" in loser
    assert counts(out) == (55, 55)

    c = subprocess.Popen(cmd(demo_root, out, "write.wait_for_lock=true"), cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True)
    fd = os.open(out / ".lock", os.O_RDWR)
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)  # hold it as another audit would
    time.sleep(3)
    assert c.poll() is None  # waiting, not failing
    os.close(fd)
    co, _ = c.communicate(timeout=300)
    assert c.returncode == 0 and "waiting for the audit writing to" in co and "resuming: 55 of 55 tensors" in co
    assert counts(out) == (55, 55)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_audit_stops_cleanly_and_resumes(demo_root, tmp_path, sig, code):
    """SIGINT to the whole process group (Ctrl-C) or SIGTERM to the driver: one line,
    exit 130 / 143, no traceback; the rerun completes with every tensor once."""
    out = tmp_path / "o"
    p = subprocess.Popen(
        cmd(demo_root, out, "fit.chunk_mb=0.002", "write.flush_rows=1"),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and len(parts(out)) < 5:
        time.sleep(0.05)
    assert p.poll() is None, "the audit finished before it could be interrupted"
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.strip().splitlines() if x.startswith("lineage:")]
    assert len(lines) == 1 and lines[0].startswith(f"lineage: stopped by {sig.name}") and "resumes" in lines[0]
    written = counts(out)
    assert 0 < written[0] == written[1] < 55
    r = subprocess.run(cmd(demo_root, out), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert counts(out) == (55, 55)
    assert not os.path.exists(f"/proc/{p.pid}")  # the driver is gone (its Ray went with it)


def test_corrupted_part_files_are_quarantined_and_recomputed(demo_root, tmp_path):
    out = tmp_path / "o"
    r = subprocess.run(
        cmd(demo_root, out, "write.flush_rows=5"), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and len(parts(out)) == 11
    q = "select tensor, status, stats_gram, blend from read_parquet('{}/tensors/**/*.parquet') order by tensor"
    before = duckdb.connect().execute(q.format(out)).fetchall()
    half, empty, garbage = parts(out)[2], parts(out)[5], parts(out)[8]
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    empty.write_bytes(b"")
    garbage.write_bytes(os.urandom(4096))
    r = subprocess.run(cmd(demo_root, out), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for p in (half, empty, garbage):
        assert f"warning: {p} is unreadable" in r.stdout and "moved to" in r.stdout
        assert (out / "quarantine" / p.parent.name / p.name).exists()
    assert "resuming: 40 of 55 tensors" in r.stdout
    assert duckdb.connect().execute(q.format(out)).fetchall() == before


def test_stale_ray_address_on_the_host_is_ignored(demo_root, tmp_path):
    """A head that died without `ray stop` leaves ray_current_cluster behind: an
    embedded audit starts its own Ray instead of retrying the dead one."""
    tmp = tempfile.mkdtemp(prefix="/tmp/lt")  # short: Ray's socket paths must fit in 107 bytes
    os.makedirs(f"{tmp}/ray")
    Path(f"{tmp}/ray/ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens on port 9
    r = subprocess.run(cmd(demo_root, tmp_path / "o"), cwd=REPO, env=env(TMPDIR=tmp), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rio-mini  blend" in r.stdout


def test_dead_ray_address_is_refused_at_once(demo_root, tmp_path):
    t0 = time.time()
    r = subprocess.run(
        cmd(demo_root, tmp_path / "o"), cwd=REPO, env=env(RAY_ADDRESS="127.0.0.1:9"), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and time.time() - t0 < 60
    assert "Ray at 127.0.0.1:9 does not answer" in one_error_line(r)


@pytest.mark.parametrize(
    "override, message",
    [
        ("compute=gpu", "compute asks 1 CPU and 1 GPU per unit, but no node has that (nodes: 1 CPU / 0 GPU)"),
        ("compute.cpus_per_task=64", "compute asks 64 CPU and 0 GPU per unit, but no node has that (nodes: 1 CPU / 0 GPU)"),
    ],
)
def test_work_no_node_can_run_is_refused(demo_root, tmp_path, override, message):
    r = subprocess.run(cmd(demo_root, tmp_path / "o", override), cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 2 and message in one_error_line(r)
