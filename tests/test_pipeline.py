"""The whole audit on a real local Ray: demo blend, real MiniLM weights, DuckDB read-back."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from benchmarks.attacks import permute_hidden
from jobs.audit import run
from jobs.settings import Settings
from tests.common import MINILM, write_model

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def settings(overrides: list[str], model_set: dict | None = None) -> Settings:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    if model_set is not None:
        from omegaconf import OmegaConf

        cfg.model_set = OmegaConf.create(model_set)
    return Settings.from_cfg(cfg)


@pytest.fixture(scope="module")
def demo_run(ray_session, demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    s = settings([f"output_dir={out}", f"demo_cache={demo_root.parent}"])
    return out, run(s)


def test_demo_is_the_rio_blend(demo_run):
    out, verdicts = demo_run
    (v,) = verdicts
    assert v["verdict"] == "blend"
    w = {p["name"]: p for p in v["parents"]}
    assert abs(w["nex-mini"]["weight"] - 0.57) < 0.01 and abs(w["qwen-mini"]["weight"] - 0.43) < 0.01
    for p in v["parents"]:
        lo, hi = p["ci95"]
        assert lo < p["weight"] < hi and hi - lo < 0.01
    assert v["closest"] == "nex-mini"
    assert v["components"]["expert"]["weights"]["nex-mini"]["mean"] == pytest.approx(0.57, abs=0.01)
    assert sorted(v["layers"]) == ["0", "1", "2", "3"]
    assert all(abs(w["nex-mini"] - 0.57) < 0.01 for w in v["layers"].values())
    on_disk = json.loads((out / "verdicts" / "rio-mini.json").read_text())
    assert on_disk == json.loads(json.dumps(v))
    assert on_disk["schema_version"] == 1 and set(on_disk["coverage"]) >= {
        "tensors",
        "tensors_compared",
        "bytes_compared",
        "skipped",
    }


def test_rerun_of_a_finished_audit_recomputes_nothing(demo_run, demo_root, capsys):
    out, (first,) = demo_run
    (again,) = run(settings([f"output_dir={out}", f"demo_cache={demo_root.parent}"]))
    assert "resuming: 55 of 55 tensors" in capsys.readouterr().out
    assert again == first


def test_tensor_rows_read_back_with_duckdb(demo_run):
    out, _ = demo_run
    con = duckdb.connect()
    ds = f"read_parquet('{out}/tensors/**/*.parquet', hive_partitioning=true)"
    n, suspects, ok = con.execute(
        f"select count(*), count(distinct suspect), count(*) filter (status = 'ok') from {ds}"
    ).fetchone()
    assert (n, suspects, ok) == (55, 1, 55)
    # every fused expert tensor of rio-mini met nex-mini's per-expert FP8 matrices
    rows = con.execute(
        f"""select tensor, c.candidate, c.tensor, c.dtype, c.corr
            from (select tensor, unnest(candidates) as c from {ds} where component = 'expert')
            where c.candidate = 'nex-mini'"""
    ).fetchall()
    assert len(rows) == 8 and all(r[3] == "F8_E4M3" and r[4] > 0.99 and "(+" in r[2] for r in rows)
    w = con.execute(
        f"select median(b.weight) from (select unnest(blend) as b from {ds} where ndim >= 2) where b.candidate = 'nex-mini'"
    ).fetchone()[0]
    assert abs(w - 0.57) < 0.005
    v = con.execute(f"select verdict, parents[1].name from read_parquet('{out}/verdicts.parquet')").fetchone()
    assert v == ("blend", "nex-mini")


def _random_bert(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """An independently initialised BERT of the same shapes (BERT's own init)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if "position_ids" in k:
            out[k] = torch.arange(shape[-1]).reshape(shape)
        elif "LayerNorm.weight" in k:
            out[k] = torch.ones(shape)
        elif k.endswith("bias"):
            out[k] = torch.zeros(shape)
        else:
            out[k] = 0.02 * torch.randn(shape, generator=g)
    return out


def test_minilm_identical_derived_unrelated(ray_session, tmp_path):
    """Real trained weights: a BF16 copy with renamed keys is identical, a noisy
    copy is derived, an independently initialised BERT is unrelated, a copy with
    its hidden dimension permuted is identical with the disguise undone."""
    real = load_file(str(MINILM))
    write_model(
        tmp_path / "copy", {f"bert.{k}": v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in real.items()}, shards=2
    )
    g = torch.Generator().manual_seed(7)
    noisy = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in real.items()}
    write_model(tmp_path / "noisy", noisy)
    write_model(tmp_path / "random", _random_bert({k: tuple(v.shape) for k, v in real.items()}, seed=1))
    write_model(tmp_path / "disguised", permute_hidden(real, 3))  # hidden dimension permuted: same function
    ms = {
        "name": "minilm",
        "suspects": [
            {"name": "copy", "source": str(tmp_path / "copy")},
            {"name": "noisy", "source": str(tmp_path / "noisy")},
            {"name": "random", "source": str(tmp_path / "random")},
            {"name": "disguised", "source": str(tmp_path / "disguised")},
        ],
        "candidates": [{"name": "all-MiniLM-L6-v2", "source": str(MINILM)}],
    }
    verdicts = {v["suspect"]: v for v in run(settings([f"output_dir={tmp_path / 'out'}"], ms))}
    assert verdicts["copy"]["verdict"] == "identical"
    assert verdicts["copy"]["parents"][0]["name"] == "all-MiniLM-L6-v2"
    assert verdicts["copy"]["coverage"]["skipped"] == {"skipped: I64 tensor is not a weight": 1}
    assert verdicts["noisy"]["verdict"] == "derived"
    assert verdicts["random"]["verdict"] == "unrelated"
    ev = verdicts["random"]["evidence"]["candidates"]["all-MiniLM-L6-v2"]
    assert abs(ev["median_z"]) < 3 and ev["frac_significant"] == 0.0
    # the gauge estimate and refit ran as Ray work and undid the permutation
    assert verdicts["disguised"]["verdict"] == "identical" and verdicts["disguised"]["undone"] == ["residual permutation"]
    assert verdicts["random"]["gauge"]["all-MiniLM-L6-v2"]["found"] is None


def test_split_tensors_give_the_same_rows(ray_session, demo_root, tmp_path):
    """Tensors split by rows across units (max_item_mb tiny) reduce to the same rows."""
    a = run(settings([f"output_dir={tmp_path / 'a'}", f"demo_cache={demo_root.parent}"]))
    b = run(
        settings(
            [
                f"output_dir={tmp_path / 'b'}",
                f"demo_cache={demo_root.parent}",
                "plan.max_item_mb=0.05",
                "plan.unit_mb=0.5",
                "fit.chunk_mb=0.01",
            ]
        )
    )
    con = duckdb.connect()
    q = "select tensor, stats_exact, list_transform(blend, lambda x: round(x.weight, 9)) from read_parquet('{}/tensors/**/*.parquet') order by tensor"
    ra, rb = con.execute(q.format(tmp_path / "a")).fetchall(), con.execute(q.format(tmp_path / "b")).fetchall()
    assert ra == rb and len(ra) == 55
    units = con.execute(f"select count(distinct unit) from read_parquet('{tmp_path / 'b'}/tensors/**/*.parquet')").fetchone()[0]
    assert units > 4
    assert a[0]["parents"][0]["weight"] == pytest.approx(b[0]["parents"][0]["weight"], abs=1e-9)
