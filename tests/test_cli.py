"""`python -m jobs.audit` as a user runs it: --config-dir model sets, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch
from safetensors.torch import load_file

from tests.common import MINILM, write_model

REPO = Path(__file__).resolve().parent.parent


def audit(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "jobs.audit", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_user_model_set_from_config_dir(tmp_path):
    real = load_file(str(MINILM))
    write_model(tmp_path / "copy", {k: v.half() if v.is_floating_point() else v for k, v in real.items()})
    (tmp_path / "conf" / "model_set").mkdir(parents=True)
    (tmp_path / "conf" / "model_set" / "mine.yaml").write_text(
        f"name: mine\nsuspects:\n  - {{name: fp16-copy, source: {tmp_path / 'copy'}}}\ncandidates:\n  - {{name: minilm, source: {MINILM}}}\n"
    )
    out = tmp_path / "out"
    p = audit("--config-dir", str(tmp_path / "conf"), "model_set=mine", f"output_dir={out}", "compute.num_cpus=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fp16-copy  identical" in p.stdout
    assert (out / "verdicts" / "fp16-copy.json").exists() and (out / "verdicts.parquet").exists()
    assert (out / ".hydra" / "config.yaml").exists()  # the exact config of the run, beside its results


def test_errors_are_one_line_with_exit_codes(tmp_path):
    (tmp_path / "conf" / "model_set").mkdir(parents=True)
    (tmp_path / "conf" / "model_set" / "bad.yaml").write_text(
        f"name: bad\nsuspects:\n  - {{name: s, source: {MINILM}}}\ncandidates: []\n"
    )
    p = audit("--config-dir", str(tmp_path / "conf"), "model_set=bad", f"output_dir={tmp_path / 'o'}")
    assert p.returncode == 2
    assert p.stderr.strip() == "lineage: error: model set bad: empty candidate list; name at least one possible parent"

    (tmp_path / "conf" / "model_set" / "self.yaml").write_text(
        f"name: self\nsuspects:\n  - {{name: s, source: {MINILM}}}\ncandidates:\n  - {{name: c, source: {MINILM}}}\n"
    )
    p = audit("--config-dir", str(tmp_path / "conf"), "model_set=self", f"output_dir={tmp_path / 'o3'}")
    assert p.returncode == 2 and "suspect s is also candidate c" in p.stderr

    p = audit("model_set=no_such_set")
    assert p.returncode == 1 and "Could not find 'model_set/no_such_set'" in p.stderr

    p = audit("fit.chunk=3")
    assert p.returncode == 1 and "Could not override 'fit.chunk'" in p.stderr

    bad = tmp_path / "trunc"
    write_model(bad, {"w": torch.randn(64, 64)})
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-100])
    (tmp_path / "conf" / "model_set" / "trunc.yaml").write_text(
        f"name: trunc\nsuspects:\n  - {{name: s, source: {MINILM}}}\ncandidates:\n  - {{name: c, source: {bad}}}\n"
    )
    p = audit("--config-dir", str(tmp_path / "conf"), "model_set=trunc", f"output_dir={tmp_path / 'o2'}")
    assert p.returncode == 2  # a broken candidate: nothing can be compared
    assert p.stderr.strip().splitlines()[-1].startswith(f"lineage: error: {bad / 'model.safetensors'} [w]: data_offsets")


@pytest.mark.slow
def test_broken_suspect_does_not_block_the_others(tmp_path):
    """Bulk audit: one truncated upload gets an inconclusive verdict with its error,
    the other suspects are audited, and the exit code (3) says so."""
    bad = tmp_path / "trunc"
    write_model(bad, {"w": torch.randn(64, 64)})
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-100])
    real = load_file(str(MINILM))
    write_model(tmp_path / "copy", real)
    (tmp_path / "conf" / "model_set").mkdir(parents=True)
    (tmp_path / "conf" / "model_set" / "bulk.yaml").write_text(
        f"name: bulk\nsuspects:\n  - {{name: broken, source: {bad}}}\n  - {{name: good, source: {tmp_path / 'copy'}}}\n"
        f"candidates:\n  - {{name: c, source: {MINILM}}}\n"
    )
    out = tmp_path / "o"
    p = audit("--config-dir", str(tmp_path / "conf"), "model_set=bulk", f"output_dir={out}", "compute.num_cpus=1")
    assert p.returncode == 3, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith(f"lineage: error: {bad / 'model.safetensors'} [w]: data_offsets")
    rows = (
        duckdb.connect()
        .execute(f"select suspect, verdict from read_parquet('{out}/verdicts.parquet') order by suspect")
        .fetchall()
    )
    assert rows == [("broken", "inconclusive"), ("good", "identical")]


@pytest.mark.slow
def test_rerun_of_a_finished_audit_never_starts_ray(demo_root, tmp_path):
    """The first run starts an embedded Ray while it plans; a rerun that finds every row
    written (and no refiner's work to do) decides from the dataset without Ray."""
    out = tmp_path / "o"
    args = (f"demo_cache={demo_root.parent}", f"output_dir={out}", "compute.num_cpus=1")
    first = audit(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "fit: 55/55 tensors" in first.stdout
    again = audit(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming: 55 of 55 tensors" in again.stdout and "fit: " not in again.stdout
    assert "waiting for ray 0.00s" in again.stdout
    assert first.stdout.split("rio-mini  blend")[1].splitlines()[0] == again.stdout.split("rio-mini  blend")[1].splitlines()[0]


def test_lineage_command_works_from_a_folder_holding_a_lineage_folder(demo_root, tmp_path):
    """Run from the folder that holds a clone named `lineage`: that folder must not shadow
    the package (it did, as a namespace package, with an import-hook editable install)."""
    from lineage.audit import run_local
    from tests.test_resume import demo_set

    run_local(demo_set(demo_root), tmp_path / "out")
    (tmp_path / "lineage" / "jobs").mkdir(parents=True)  # what a clone looks like from its parent
    (tmp_path / "lineage" / "README.md").write_text("a clone\n")
    exe = Path(sys.executable).parent / "lineage"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    show = subprocess.run(
        [str(exe), "show", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert show.returncode == 0, show.stderr[-2000:]
    assert show.stdout.splitlines()[2].startswith("rio-mini  blend")
    helped = subprocess.run(
        [sys.executable, "-m", "jobs.audit", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0 and "Exit codes: 0 all audited" in helped.stdout, helped.stderr[-2000:]
    report = subprocess.run(
        [str(exe), "report", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0 and report.stdout.strip() == str(tmp_path / "out" / "report.html")
    bad = subprocess.run([str(exe), "show", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("lineage: error: ") and "no verdicts.parquet here" in bad.stderr
