"""Bulk audits: many suspects against a pool, candidate bytes read once, relations
between suspects, pool screening, suspect lists, multirun, the analytics tables,
and an embedded audit beside another Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lineage.audit import run_local
from lineage.errors import LineageError
from lineage.modelset import ModelSet
from lineage.screening import Screening
from tests.common import kill_matching, modelset, write_model
from tests.golden import rows_snapshot, same

REPO = Path(__file__).resolve().parent.parent


def layered(seed: int, layers: int = 3, rows: int = 512, cols: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for i in range(layers):
        w[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(rows, cols, generator=g)
        w[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(cols, rows, generator=g)
        w[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(cols, generator=g)
    return w


def bf(w: dict) -> dict:
    return {k: v.to(torch.bfloat16) for k, v in w.items()}


def noise(w: dict, seed: int, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std() * torch.randn(v.shape, generator=g) for k, v in w.items()}


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> tuple[dict[str, Path], dict[str, Path]]:
    """Eight uploads against a pool of two: copies under two names, fine-tunes of a
    fine-tune, a blend, an unrelated model."""
    root = tmp_path_factory.mktemp("bulk")
    base, other = layered(1), layered(2)
    ft = noise(base, 10)
    pool = {"base": write_model(root / "base", bf(base)), "other": write_model(root / "other", bf(other))}
    sus = {
        "ft": bf(ft),
        "ft-reupload": bf(ft),
        "ft-further": bf(noise(ft, 11, 0.02)),
        "ft2": bf(noise(base, 12)),
        "mix": bf({k: 0.6 * base[k] + 0.4 * other[k] for k in base}),
        "base-copy": bf(base),
        "stranger": bf(layered(3)),
        "other-ft": bf(noise(other, 13)),
    }
    return {n: write_model(root / n, w) for n, w in sus.items()}, pool


def test_shared_reads_give_each_suspect_its_own_audit(uploads, tmp_path):
    """One job reads every candidate byte once (1.0x the models' bytes, at most 1.1x),
    and every suspect's rows and verdict equal those of its own audit, bit for bit."""
    sus, pool = uploads
    (tmp_path / "bulk").mkdir()
    bulk = {v["suspect"]: v for v in run_local(ModelSet.from_dict(modelset(sus, pool)), tmp_path / "bulk")}
    run = json.loads((tmp_path / "bulk" / "audit.json").read_text())["runs"][-1]
    models = sum(f.stat().st_size for p in [*sus.values(), *pool.values()] for f in p.glob("*.safetensors"))
    assert run["bytes_fit"] <= 1.1 * models, (run, models)
    separate = sum(f.stat().st_size for p in sus.values() for f in p.glob("*.safetensors")) + len(sus) * sum(
        f.stat().st_size for p in pool.values() for f in p.glob("*.safetensors")
    )
    assert run["bytes_fit"] < 0.5 * separate
    rows = rows_snapshot(tmp_path / "bulk")
    for name, path in sus.items():
        (alone,) = run_local(ModelSet.from_dict(modelset({name: path}, pool)), tmp_path / name)
        mine = [{k: v for k, v in r.items() if k != "bytes_read"} for r in rows if r["suspect"] == name]
        theirs = [{k: v for k, v in r.items() if k != "bytes_read"} for r in rows_snapshot(tmp_path / name)]
        assert mine == theirs, name
        keys = ("verdict", "parents", "method", "closest", "components", "layers")
        assert same({k: bulk[name].get(k) for k in keys}, {k: alone.get(k) for k in keys}, rel=0) == [], name
    assert (
        bulk["ft"]["verdict"] == "derived" and bulk["mix"]["verdict"] == "blend" and bulk["base-copy"]["verdict"] == "identical"
    )
    assert bulk["stranger"]["verdict"] == "unrelated"


def test_relations_between_suspects(uploads, tmp_path):
    sus, pool = uploads
    vs = {v["suspect"]: v for v in run_local(ModelSet.from_dict(modelset(sus, pool)), tmp_path / "o")}
    rel = {r["suspect"]: r["kind"] for r in vs["ft"]["relations"]}
    assert rel.get("ft-reupload") == "copy" and rel.get("ft-further") == "derivative"
    assert "stranger" not in rel and "ft2" not in rel  # a sibling fine-tune of base is not a derivative of ft
    assert {r["suspect"]: r["kind"] for r in vs["ft-reupload"]["relations"]}["ft"] == "copy"
    con = duckdb.connect()
    copies = con.execute(
        f"select suspect, other from read_parquet('{tmp_path}/o/relations.parquet') where kind = 'copy' order by 1, 2"
    ).fetchall()
    assert ("ft", "ft-reupload") in copies and ("ft-reupload", "ft") in copies
    parents = con.execute(
        f"select other, weight from read_parquet('{tmp_path}/o/relations.parquet') where suspect = 'mix' and kind = 'parent' order by weight desc"
    ).fetchall()
    assert [p for p, _ in parents] == ["base", "other"] and abs(parents[0][1] - 0.6) < 0.01


def test_every_column_is_documented_in_the_files(uploads, tmp_path):
    sus, pool = uploads
    run_local(ModelSet.from_dict(modelset(dict(list(sus.items())[:3]), pool)), tmp_path / "o")
    files = [tmp_path / "o" / "verdicts.parquet", tmp_path / "o" / "relations.parquet"]
    files += (
        list((tmp_path / "o" / "tensors").rglob("part-*.parquet"))[:1]
        + list((tmp_path / "o" / "pairs").glob("part-*.parquet"))[:1]
    )
    assert len(files) == 4
    for f in files:
        schema = pq.read_schema(f)
        assert schema.metadata[b"lineage.schema_version"] and schema.metadata[b"lineage.dataset"]
        for field in schema:
            assert field.metadata and field.metadata[b"description"], (f.name, field.name)
    assert (tmp_path / "o" / "verdicts.parquet").stat().st_mode & 0o044 == 0o044  # readable by the group and others (umask 022)


@pytest.mark.slow
def test_pool_screening_keeps_the_parents_and_reads_a_fraction(tmp_path):
    """A pool of 12 with 2 true parents: the same verdict and weights as fitting all 12,
    reading at most 30% of the bytes that fitting all 12 reads."""
    big = {"layers": 2, "rows": 4096, "cols": 1024}
    a, b = layered(101, **big), layered(102, **big)
    pool = {f"c{i}": write_model(tmp_path / f"c{i}", bf(layered(200 + i, **big))) for i in range(10)}
    pool |= {"A": write_model(tmp_path / "A", bf(a)), "B": write_model(tmp_path / "B", bf(b))}
    sus = write_model(tmp_path / "s", bf({k: 0.6 * a[k] + 0.4 * b[k] for k in a}))
    ms = ModelSet.from_dict(modelset({"s": sus}, pool))
    (screened,) = run_local(ms, tmp_path / "screened")
    (everything,) = run_local(ms, tmp_path / "all", screening=Screening(screen_above=100))
    for v in (screened, everything):
        assert (v["verdict"], v["method"], [p["name"] for p in v["parents"]]) == ("blend", "linear", ["A", "B"])
    for p, q in zip(screened["parents"], everything["parents"]):
        assert abs(p["weight"] - q["weight"]) < 1e-6 and all(abs(x - y) < 1e-6 for x, y in zip(p["ci95"], q["ci95"]))
    assert sorted(c["name"] for c in screened["screened_out"]) == sorted(f"c{i}" for i in range(10))
    assert all(abs(c["median_z"]) < 6 for c in screened["screened_out"])
    r1 = json.loads((tmp_path / "screened" / "audit.json").read_text())["runs"][-1]
    r2 = json.loads((tmp_path / "all" / "audit.json").read_text())["runs"][-1]
    assert r1["bytes_screening"] + r1["bytes_fit"] <= 0.3 * r2["bytes_fit"], (r1, r2)
    (again,) = run_local(ms, tmp_path / "screened")  # a rerun reuses screening.json: nothing screened again
    assert json.loads((tmp_path / "screened" / "audit.json").read_text())["runs"][-1]["bytes_screening"] == 0
    assert again["parents"] == screened["parents"]


def test_suspects_from_csv_parquet_and_text(uploads, tmp_path):
    sus, pool = uploads
    rows = list(sus.items())[:3]
    (tmp_path / "u.csv").write_text("name,source\n" + "".join(f"{n},{p}\n" for n, p in rows))
    pq.write_table(pa.table({"name": [n for n, _ in rows], "source": [str(p) for _, p in rows]}), tmp_path / "u.parquet")
    (tmp_path / "u.txt").write_text("# uploads of the week\n\n" + "".join(f"{n} {p}\n" for n, p in rows))
    for f in ("u.csv", "u.parquet", "u.txt"):
        ms = ModelSet.from_dict(
            {"name": "b", "suspects_from": str(tmp_path / f), "candidates": [{"name": "base", "source": str(pool["base"])}]}
        )
        assert [m.name for m in ms.suspects] == [n for n, _ in rows], f
    (tmp_path / "bad.csv").write_text("name,source\nok,/x\nbad/name,/y\n")
    with pytest.raises(LineageError, match=r"bad.csv:3: model set b: suspect name 'bad/name' must be letters"):
        ModelSet.from_dict(
            {"name": "b", "suspects_from": str(tmp_path / "bad.csv"), "candidates": [{"name": "c", "source": "/c"}]}
        )
    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(LineageError, match="suspects_from list is a FIFO"):
        ModelSet.from_dict(
            {"name": "b", "suspects_from": str(tmp_path / "fifo.csv"), "candidates": [{"name": "c", "source": "/c"}]}
        )


def env(**extra: str) -> dict:
    e = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", **extra}
    e.pop("RAY_ADDRESS", None)
    return e


@pytest.mark.slow
def test_multirun_writes_each_model_set_to_its_own_output_dir(uploads, tmp_path):
    sus, pool = uploads
    conf = tmp_path / "conf" / "model_set"
    conf.mkdir(parents=True)
    for name, members in (("first", list(sus.items())[:2]), ("second", list(sus.items())[2:4])):
        lines = "".join(f"  - {{name: {n}, source: {p}}}\n" for n, p in members)
        (conf / f"{name}.yaml").write_text(
            f"name: {name}\nsuspects:\n{lines}candidates:\n  - {{name: base, source: {pool['base']}}}\n"
        )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.audit",
            "-m",
            "--config-dir",
            str(tmp_path / "conf"),
            "model_set=first,second",
            "compute.num_cpus=1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("first", "second"):
        got = (
            duckdb.connect()
            .execute(f"select count(*) from read_parquet('{tmp_path}/outputs/{name}/verdicts.parquet')")
            .fetchone()
        )
        assert got == (2,)


@pytest.mark.slow
def test_embedded_audit_never_joins_another_ray_on_the_host(uploads, tmp_path):
    """A Ray head is running on the host and its address file is where ray.init looks;
    it offers no CPU, so an audit that joined it could never run a unit. The audit
    starts its own Ray and finishes."""
    sus, pool = uploads
    tmp = tempfile.mkdtemp(prefix="/tmp/lr")  # short: Ray's socket paths
    bin_ = Path(sys.executable).parent
    head = subprocess.run(
        [
            str(bin_ / "ray"),
            "start",
            "--head",
            "--num-cpus=0",
            "--include-dashboard=false",
            "--port=0",
            "--node-ip-address=127.0.0.1",
        ],
        env=env(TMPDIR=tmp),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        assert (Path(tmp) / "ray" / "ray_current_cluster").exists()
        conf = tmp_path / "conf" / "model_set"
        conf.mkdir(parents=True)
        (conf / "e.yaml").write_text(
            f"name: e\nsuspects:\n  - {{name: ft, source: {sus['ft']}}}\ncandidates:\n  - {{name: base, source: {pool['base']}}}\n"
        )
        t0 = time.time()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "jobs.audit",
                "--config-dir",
                str(tmp_path / "conf"),
                "model_set=e",
                f"output_dir={tmp_path / 'o'}",
                "compute.num_cpus=1",
            ],
            cwd=REPO,
            env=env(TMPDIR=tmp),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "ft       derived" in r.stdout and time.time() - t0 < 120
    finally:
        kill_matching(tmp)  # this head only: `ray stop` would stop every Ray on the host
        shutil.rmtree(tmp, ignore_errors=True)
