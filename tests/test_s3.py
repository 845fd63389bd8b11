"""s3:// sources against a real S3-compatible server on loopback (moto's server, spoken to by
pyarrow's S3 filesystem, the AWS SDK): planned from listings and headers, every worker reading
its own byte ranges, the results equal to the same audit on disk; an object changed since
planning is an error row or a refused resume, never a wrong statistic."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("moto")

from lineage.audit import run_local  # noqa: E402
from lineage.errors import LineageError  # noqa: E402
from lineage.options import FitOptions  # noqa: E402
from lineage.remote import objectstore as s3mod  # noqa: E402
from lineage.source import resolve  # noqa: E402
from tests.golden import rows_snapshot  # noqa: E402
from tests.test_hub import REPO, blend_set, trio  # noqa: E402

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on loopback with bucket `models`, this process pointed at it; yields
    (endpoint, pyarrow filesystem with write access)."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {**ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    s3mod.filesystem.cache_clear()
    store = fs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True)
    store.create_dir("models")
    yield endpoint, store
    s3mod.filesystem.cache_clear()
    server.stop()


def upload(store, models: dict[str, Path], scheme: str = "s3://") -> dict[str, str]:
    """Each folder under models/NAME of the bucket `models`; name -> its source URL."""
    for name, folder in models.items():
        for f in folder.iterdir():
            with store.open_output_stream(f"models/{name}/{f.name}") as out:
                out.write(f.read_bytes())
    return {name: f"{scheme}models/{name}" for name in models}


def audit_equals_the_same_audit_on_disk(store, tmp_path: Path, scheme: str) -> dict:
    """A trio uploaded to `store` and audited from there: the same rows and verdict as on disk,
    each object's size and modification time recorded. The remote verdict."""
    models = trio(tmp_path / "m")
    src = upload(store, models, scheme)
    (local,) = run_local(blend_set(models), tmp_path / "local")
    (remote,) = run_local(blend_set(src), tmp_path / "remote")
    assert rows_snapshot(tmp_path / "remote") == rows_snapshot(tmp_path / "local")
    assert remote["verdict"] == "blend" and remote["parents"] == local["parents"]
    files = remote["sources"]["ft"]["files"]
    assert files["model-00002-of-00002.safetensors"]["size"] == (models["ft"] / "model-00002-of-00002.safetensors").stat().st_size
    assert all(f["mtime_ns"] > 0 for f in files.values())
    return remote


def changed_objects_are_error_rows_and_refuse_a_resume(store, tmp_path: Path, scheme: str) -> None:
    """An object replaced after planning (1 KB longer: the planned offsets would read other
    bytes) makes its tensors error rows, and a resume of a finished output_dir is refused."""
    from lineage.audit import Reducer, plan_audit
    from lineage.output import read_rows
    from lineage.work import run_unit

    models = trio(tmp_path / "m")
    src = upload(store, models, scheme)
    run_local(blend_set(src), tmp_path / "done")
    plan = plan_audit(blend_set(src)).pack(1 << 30)
    data = (models["mix"] / "model.safetensors").read_bytes()
    with store.open_output_stream("models/mix/model.safetensors") as out:
        out.write(data + b" " * 1024)
    red = Reducer(plan, tmp_path / "o")
    for u in plan.units:
        red.add(run_unit(u, FitOptions(base="base")), u.uid)
    red.finish()
    reasons = {r["reason"] for r in read_rows(tmp_path / "o", "mix")}
    assert any("the object changed since the audit was planned" in r for r in reasons), reasons
    with pytest.raises(LineageError, match=f"objects under {scheme}models/mix changed"):
        run_local(blend_set(src), tmp_path / "done")


def test_audit_over_s3_equals_the_same_audit_on_disk(s3, tmp_path):
    audit_equals_the_same_audit_on_disk(s3[1], tmp_path, "s3://")


def test_changed_objects_are_error_rows_and_refuse_a_resume(s3, tmp_path):
    changed_objects_are_error_rows_and_refuse_a_resume(s3[1], tmp_path, "s3://")


def test_missing_prefix_and_pickles_are_one_line_errors(s3, tmp_path):
    _, store = s3
    with pytest.raises(LineageError, match="no objects under this prefix"):
        resolve("x", "s3://models/nothing-here")
    with store.open_output_stream("models/pickled/pytorch_model.bin") as out:
        out.write(b"\x80\x04not opened")
    with pytest.raises(LineageError, match="never unpickles"):
        resolve("x", "s3://models/pickled")
    with pytest.raises(LineageError, match="expected s3://BUCKET/PREFIX"):
        resolve("x", "s3:///no-bucket")


@pytest.mark.slow
def test_command_line_audit_of_s3_sources_on_ray(s3, tmp_path):
    """`python -m jobs.audit` with s3:// sources: real Ray workers read their own ranges."""
    endpoint, store = s3
    models = trio(tmp_path / "m")
    upload(store, models)
    conf = tmp_path / "conf" / "model_set"
    conf.mkdir(parents=True)
    (conf / "s.yaml").write_text(
        "name: s\nsuspects:\n  - {name: mix, source: s3://models/mix}\ncandidates:\n"
        "  - {name: base, source: s3://models/base, base: true}\n  - {name: ft, source: s3://models/ft}\n"
    )
    env = {**os.environ, **ENV, "AWS_ENDPOINT_URL": endpoint, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    cmd = ["-m", "jobs.audit", "--config-dir", str(tmp_path / "conf"), "model_set=s", f"output_dir={out}", "compute.num_cpus=2"]
    r = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (local,) = run_local(blend_set(models), tmp_path / "local")
    assert rows_snapshot(out) == rows_snapshot(tmp_path / "local")
