"""gs:// sources against a real GCS-compatible server on loopback (gcp-storage-emulator, spoken
to by pyarrow's GCS filesystem, google-cloud-cpp, pointed at it by STORAGE_EMULATOR_HOST as
Google's own clients are): planned from listings and headers, every worker reading its own byte
ranges, the results equal to the same audit on disk; an object changed since planning is an
error row or a refused resume; a store that does not answer is a one-line error in seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("gcp_storage_emulator")

from lineage.audit import run_local  # noqa: E402
from lineage.errors import LineageError  # noqa: E402
from lineage.remote import objectstore  # noqa: E402
from lineage.source import resolve  # noqa: E402
from tests.golden import rows_snapshot  # noqa: E402
from tests.test_hub import REPO, blend_set, trio  # noqa: E402
from tests.test_s3 import audit_equals_the_same_audit_on_disk, changed_objects_are_error_rows_and_refuse_a_resume, upload  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gcs(monkeypatch):
    """An in-memory GCS emulator on loopback with bucket `models` (a process of its own: pyarrow
    holds the GIL while it waits for a server in this one), this process pointed at it; yields
    (host:port, pyarrow filesystem)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        [*cmd, "--default-bucket", "models", "--in-memory", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.1)
        host = f"127.0.0.1:{port}"
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{host}")
        objectstore.filesystem.cache_clear()
        yield host, objectstore.filesystem("gs://")
    finally:
        objectstore.filesystem.cache_clear()
        server.terminate()
        server.wait(timeout=30)


def test_audit_over_gcs_equals_the_same_audit_on_disk(gcs, tmp_path):
    remote = audit_equals_the_same_audit_on_disk(gcs[1], tmp_path, "gs://")
    assert remote["sources"]["ft"]["commit"].startswith("gs:")


def test_changed_objects_are_error_rows_and_refuse_a_resume(gcs, tmp_path):
    changed_objects_are_error_rows_and_refuse_a_resume(gcs[1], tmp_path, "gs://")


def test_missing_prefix_bad_url_and_dead_store_are_one_line_errors(gcs, tmp_path, monkeypatch):
    _, store = gcs
    with pytest.raises(LineageError, match="no objects under this prefix"):
        resolve("x", "gs://models/nothing-here")
    with store.open_output_stream("models/pickled/pytorch_model.bin") as out:
        out.write(b"\x80\x04not opened")
    with pytest.raises(LineageError, match="never unpickles"):
        resolve("x", "gs://models/pickled")
    with pytest.raises(LineageError, match="expected gs://BUCKET/PREFIX"):
        resolve("x", "gs:///no-bucket")
    # nothing listens there: the SDK's retries are capped, so this is an error, not a wait
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setattr(objectstore, "SDK_RETRY_S", 2.0)  # the cap itself is what is tested, not its 20 s
    objectstore.filesystem.cache_clear()
    t = time.monotonic()
    with pytest.raises(LineageError, match="cannot be listed") as e:
        resolve("x", "gs://models/anything")
    assert "\n" not in str(e.value)
    assert time.monotonic() - t < 4 * objectstore.SDK_RETRY_S


@pytest.mark.slow
def test_command_line_audit_of_gcs_sources_on_ray(gcs, tmp_path):
    """`python -m jobs.audit` with gs:// sources: real Ray workers read their own ranges."""
    host, store = gcs
    models = trio(tmp_path / "m")
    upload(store, models, "gs://")
    conf = tmp_path / "conf" / "model_set"
    conf.mkdir(parents=True)
    (conf / "g.yaml").write_text(
        "name: g\nsuspects:\n  - {name: mix, source: gs://models/mix}\ncandidates:\n"
        "  - {name: base, source: gs://models/base, base: true}\n  - {name: ft, source: gs://models/ft}\n"
    )
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://{host}", "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    cmd = ["-m", "jobs.audit", "--config-dir", str(tmp_path / "conf"), "model_set=g", f"output_dir={out}", "compute.num_cpus=2"]
    r = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run_local(blend_set(models), tmp_path / "local")
    assert rows_snapshot(out) == rows_snapshot(tmp_path / "local")
