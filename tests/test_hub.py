"""hf:// sources over real HTTP: the real huggingface_hub client, a hub-compatible
server on loopback (tests/hubserver.py), real safetensors files served by range.

The driver plans from remote headers only, workers fetch their own byte
ranges; the results must equal the same audit on the same files on disk, a
sampled audit must fetch no more than its fraction, and a server that fails
or lies must never change a statistic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch

from lineage.audit import run_local
from lineage.errors import LineageError
from lineage.modelset import ModelSet
from lineage.options import FitOptions
from lineage.remote import RemoteOptions
from lineage.source import resolve
from tests.common import modelset, write_model
from tests.golden import rows_snapshot
from tests.hubserver import Hub, hub_env

REPO = Path(__file__).resolve().parent.parent


def trio(root: Path, rows: int = 256, cols: int = 256, n: int = 4, seed: int = 0) -> dict[str, Path]:
    """base, a fine-tune of it and 0.6 ft + 0.4 base, in BF16, as folders (one with an index)."""
    g = torch.Generator().manual_seed(seed)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(rows, cols, generator=g) for i in range(n)}
    base["model.norm.weight"] = 1 + 0.1 * torch.randn(cols, generator=g)
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    mix = {k: 0.6 * ft[k] + 0.4 * base[k] for k in base}
    bf = lambda w: {k: v.to(torch.bfloat16) for k, v in w.items()}  # noqa: E731
    return {
        "base": write_model(root / "base", bf(base)),
        "ft": write_model(root / "ft", bf(ft), shards=2),
        "mix": write_model(root / "mix", bf(mix)),
    }


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The loopback hub, this process pointed at it with an empty Hugging Face cache of its own."""
    import huggingface_hub.constants as c

    with Hub() as h:
        for k, v in hub_env(h, tmp_path / "hf-home").items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
        yield h


def upload(hub: Hub, models: dict[str, Path], org: str = "org") -> dict[str, str]:
    """Each folder as repository ORG/NAME at one commit on main; name -> hf:// source."""
    return {name: (hub.repo(f"{org}/{name}").add_commit(folder), f"hf://{org}/{name}")[1] for name, folder in models.items()}


def blend_set(src: dict[str, str | Path]) -> ModelSet:
    return ModelSet.from_dict(modelset({"mix": src["mix"]}, {"base": src["base"], "ft": src["ft"]}, base="base"))


def test_server_speaks_huggingface_hub(hub, tmp_path):
    """The real client against the server: repo info, tree, HEAD and ranged GETs, downloads."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    models = trio(tmp_path / "m")
    commit = hub.repo("org/ft").add_commit(models["ft"])
    api = HfApi(endpoint=hub.endpoint)
    assert api.repo_info("org/ft").sha == commit
    tree = {f.path: f for f in api.list_repo_tree("org/ft", revision=commit, recursive=True)}
    assert tree["model-00001-of-00002.safetensors"].lfs.size == (models["ft"] / "model-00001-of-00002.safetensors").stat().st_size
    p = hf_hub_download("org/ft", "model.safetensors.index.json", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    assert Path(p).read_bytes() == (models["ft"] / "model.safetensors.index.json").read_bytes()
    snap = Path(snapshot_download("org/ft", endpoint=hub.endpoint, cache_dir=tmp_path / "c"))
    assert snap.name == commit
    for f in models["ft"].iterdir():
        assert (snap / f.name).read_bytes() == f.read_bytes()


def test_planning_fetches_headers_only(hub, tmp_path):
    models = trio(tmp_path / "m")
    src = upload(hub, models)
    hub.reset_counts()
    m = resolve("ft", src["ft"])
    assert m.commit == hub.repo("org/ft").branches["main"] and len(m.tensors) == 5
    assert all(t.path.startswith(f"{hub.endpoint}/org/ft/resolve/{m.commit}/") for t in m.tensors.values())
    sizes = {f.name: f.stat().st_size for f in models["ft"].iterdir()}
    headers = sum(t.start for t in {t.path: t for t in m.tensors.values()}.values())  # bytes before data, at least
    assert hub.total_sent < headers + sizes["model.safetensors.index.json"] + 2 * 16 + 4096
    assert m.files["model-00001-of-00002.safetensors"]["sha256"] == hub.sha(models["ft"] / "model-00001-of-00002.safetensors")


def test_audit_over_http_equals_the_same_audit_on_disk(hub, tmp_path):
    models = trio(tmp_path / "m")
    src = upload(hub, models)
    (local,) = run_local(blend_set(models), tmp_path / "local")
    hub.reset_counts()
    (remote,) = run_local(blend_set(src), tmp_path / "remote")
    assert rows_snapshot(tmp_path / "remote") == rows_snapshot(tmp_path / "local")
    assert remote["verdict"] == "blend" and remote["parents"] == local["parents"]
    data = sum(f.stat().st_size for p in models.values() for f in p.glob("*.safetensors"))
    assert data <= hub.total_sent < data * 1.02  # every byte once (headers and coalesced gaps aside)
    commit = hub.repo("org/mix").branches["main"]
    assert remote["sources"]["mix"]["commit"] == commit and remote["sources"]["mix"]["source"] == "hf://org/mix"
    audit = json.loads((tmp_path / "remote" / "audit.json").read_text())
    assert audit["sources"]["ft"]["files"]["model-00002-of-00002.safetensors"]["sha256"] == hub.sha(
        models["ft"] / "model-00002-of-00002.safetensors"
    )


def test_sampled_audit_fetches_its_fraction(hub, tmp_path):
    """4096 x 1024 BF16 matrices are 32 sample blocks each: at 10% three are fetched, at 1%
    one (at least one block per tensor), plus the headers; nothing else."""
    from lineage.sampling import block_rows, sample_ranges

    models = trio(tmp_path / "m", rows=4096, cols=1024, n=3)
    src = upload(hub, models)
    data = sum(f.stat().st_size for p in models.values() for f in p.glob("*.safetensors"))
    headers = 3 * 4096 + 2 * 4096  # generous: each header and index is well under 4 KB
    for frac in (0.1, 0.01):
        hub.reset_counts()
        (v,) = run_local(blend_set(src), tmp_path / f"s{frac}", FitOptions(sample_fraction=frac))
        assert v["verdict"] == "blend"
        rows = sum(b - a for a, b in sample_ranges(0, 4096, block_rows(1024), frac, "model.layers.0.mlp.up_proj.weight"))
        sampled = 3 * 3 * rows * 1024 * 2 + 3 * 1024 * 2  # 3 matrices x 3 models, norms whole
        assert hub.total_sent <= sampled + headers, (frac, hub.total_sent, sampled)
        assert rows <= max(frac, 1 / 32) * 4096
    assert sampled < 0.04 * data


def test_flaky_server_gives_the_identical_dataset(hub, tmp_path):
    """A third of the range requests fail at random (500, 429, a connection dropped
    mid-body); retried, the dataset is the same, bit for bit."""
    models = trio(tmp_path / "m", rows=4096, cols=1024, n=3)  # 8 MB tensors: two 4 MB spans each
    src = upload(hub, models)
    run_local(blend_set(src), tmp_path / "clean")
    hub.fail_rate = 0.3
    run_local(blend_set(src), tmp_path / "flaky", FitOptions(remote=RemoteOptions(retries=12, backoff_s=0.01)))
    assert min(hub.faults[k] for k in ("500", "429", "drop")) >= 1, hub.faults
    assert rows_snapshot(tmp_path / "flaky") == rows_snapshot(tmp_path / "clean")


def test_lying_server_gives_error_rows_never_wrong_statistics(hub, tmp_path):
    """Every body cut short under a full Content-Length: retried, then an error row."""
    models = trio(tmp_path / "m")
    src = upload(hub, models)
    from lineage.audit import Reducer, decide_all, plan_audit
    from lineage.work import run_unit
    from tests.common import local_runner

    plan = plan_audit(blend_set(src)).pack(1 << 30)
    hub.lie = True
    opts = FitOptions(base="base", remote=RemoteOptions(retries=1, backoff_s=0.01))
    red = Reducer(plan, tmp_path / "o")
    for u in plan.units:
        red.add(run_unit(u, opts), u.uid)
    red.finish()
    (v,) = decide_all(plan, tmp_path / "o", local_runner(opts))
    rows = duckdb.connect().execute(f"select status, reason from read_parquet('{tmp_path}/o/tensors/**/*.parquet')").fetchall()
    assert {s for s, _ in rows} == {"error"}
    assert all("failed after 2 attempts" in r and ("short body" in r or "RemoteProtocolError" in r) for _, r in rows), rows
    assert v["verdict"] == "inconclusive"


def test_header_above_the_cap_is_refused_before_it_is_fetched(hub, tmp_path):
    import struct

    d = tmp_path / "huge"
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 200 << 20) + b"{}" + bytes(64))
    hub.repo("org/huge").add_commit(d)
    hub.reset_counts()
    with pytest.raises(LineageError, match="header length 209715200 exceeds the cap of 104857600 bytes"):
        resolve("huge", "hf://org/huge")
    assert hub.bytes_sent["model.safetensors"] == 8


def test_revision_moved_after_planning_is_neither_mixed_nor_resumed(hub, tmp_path):
    """The audit reads the commit it planned; a resume after `main` moved is refused."""
    models = trio(tmp_path / "m")
    src = upload(hub, models)
    first = hub.repo("org/mix").branches["main"]
    (v,) = run_local(blend_set(src), tmp_path / "o")
    assert v["sources"]["mix"]["commit"] == first
    moved = trio(tmp_path / "m2", seed=9)["mix"]
    second = hub.repo("org/mix").add_commit(moved)
    with pytest.raises(LineageError, match=f"hf://org/mix has moved from commit {first} to {second}"):
        run_local(blend_set(src), tmp_path / "o")
    pinned = {**src, "mix": f"hf://org/mix@{first}"}
    (again,) = run_local(blend_set(pinned), tmp_path / "pinned")
    assert again["parents"] == v["parents"]


def test_file_changed_on_the_hub_since_planning_becomes_error_rows(hub, tmp_path):
    models = trio(tmp_path / "m")
    src = upload(hub, models)
    from lineage.audit import Reducer, plan_audit
    from lineage.output import read_rows
    from lineage.work import run_unit

    plan = plan_audit(blend_set(src)).pack(1 << 30)
    f = models["mix"] / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes, served at the same commit
    f.write_bytes(bytes(data))
    hub._sha.clear()
    red = Reducer(plan, tmp_path / "o")
    for u in plan.units:
        red.add(run_unit(u, FitOptions(base="base")), u.uid)
    red.finish()
    reasons = {r["reason"] for r in read_rows(tmp_path / "o", "mix")}
    assert any("the file changed on the hub since the audit was planned" in r for r in reasons), reasons


def test_a_file_in_the_local_cache_is_read_locally(hub, tmp_path):
    from huggingface_hub import snapshot_download

    models = trio(tmp_path / "m")
    src = upload(hub, models)
    snapshot_download("org/base", endpoint=hub.endpoint)  # into this process's (temporary) cache
    hub.reset_counts()
    run_local(blend_set(src), tmp_path / "o")
    base_bytes = sum(f.stat().st_size for f in models["base"].glob("*.safetensors"))
    data = sum(f.stat().st_size for p in models.values() for f in p.glob("*.safetensors"))
    assert hub.total_sent < data - base_bytes + 4096


def test_worker_fetch_cache_fetches_nothing_twice(hub, tmp_path):
    models = trio(tmp_path / "m")
    src = upload(hub, models)
    opts = FitOptions(remote=RemoteOptions(cache_dir=str(tmp_path / "fetched")))
    run_local(blend_set(src), tmp_path / "a", opts)
    hub.reset_counts()
    run_local(blend_set(src), tmp_path / "b", opts)
    tensor_bytes = sum(n for k, n in hub.bytes_sent.items() if k.endswith(".safetensors"))
    assert tensor_bytes < 16 * 1024  # headers only: every tensor range came from the cache
    assert rows_snapshot(tmp_path / "a") == rows_snapshot(tmp_path / "b")


@pytest.mark.slow
def test_command_line_audit_of_hub_sources_on_ray(hub, tmp_path):
    """`python -m jobs.audit` with hf:// sources: real Ray workers fetch their own ranges."""
    models = trio(tmp_path / "m")
    src = upload(hub, models)
    conf = tmp_path / "conf" / "model_set"
    conf.mkdir(parents=True)
    (conf / "h.yaml").write_text(
        "name: h\nsuspects:\n  - {name: mix, source: hf://org/mix}\ncandidates:\n"
        "  - {name: base, source: hf://org/base, base: true}\n  - {name: ft, source: hf://org/ft}\n"
    )
    env = {**os.environ, **hub_env(hub, tmp_path / "hf-cli"), "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.audit",
            "--config-dir",
            str(tmp_path / "conf"),
            "model_set=h",
            f"output_dir={out}",
            "compute.num_cpus=2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    v = json.loads((out / "verdicts" / "mix.json").read_text())
    assert v["verdict"] == "blend" and {p["name"] for p in v["parents"]} == {"ft", "base"}
    assert v["sources"]["ft"]["commit"] == hub.repo("org/ft").branches["main"]
    (local,) = run_local(blend_set(models), tmp_path / "local")
    assert rows_snapshot(out) == rows_snapshot(tmp_path / "local")
    assert not list((tmp_path / "hf-cli").rglob("*.safetensors"))  # nothing downloaded whole
    assert src
