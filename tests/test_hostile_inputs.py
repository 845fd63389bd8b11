"""Hostile input, second wave: filesystem objects, names, output folders,
config.json and index values, extreme numbers. Real FIFOs, real files, the
real command line; nothing here may hang (every subprocess has a timeout
far below what a hang would take) and every failure is one escaped line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lineage.audit import Reducer, decide_all, plan_audit, run_local
from lineage.errors import LineageError
from lineage.modelconfig import head_dim
from lineage.modelset import ModelSet
from lineage.options import FitOptions
from lineage.output import read_rows
from lineage.source import resolve
from lineage.work import run_unit
from tests.common import MINILM, local_runner, modelset, raw_safetensors, write_model

REPO = Path(__file__).resolve().parent.parent


def audit(*args: str, cwd: Path = REPO, timeout: int = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", **(env or {})}
    e.pop("RAY_ADDRESS", None) if "RAY_ADDRESS" not in (env or {}) else None
    return subprocess.run(
        [sys.executable, "-m", "jobs.audit", *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout
    )


def model_set_file(conf: Path, name: str, body: str) -> Path:
    (conf / "model_set").mkdir(parents=True, exist_ok=True)
    (conf / "model_set" / f"{name}.yaml").write_text(body)
    return conf


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """The single line on stderr, which must be lineage's own (no traceback)."""
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("lineage: error: "), lines
    return lines[0]


@pytest.fixture
def small(tmp_path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    c = {f"w{i}": torch.randn(32, 32, generator=g) for i in range(3)}
    s = {k: v + 0.05 * torch.randn(32, 32, generator=g) for k, v in c.items()}
    return write_model(tmp_path / "c", c), write_model(tmp_path / "s", s)


# -- filesystem objects: nothing blocks -------------------------------------------------


def test_fifo_shards_indexes_and_sources_are_refused_without_blocking(tmp_path, small):
    cand, _ = small
    only = tmp_path / "only-fifo"
    only.mkdir()
    os.mkfifo(only / "model.safetensors")
    with pytest.raises(LineageError, match=r"only-fifo/model.safetensors: safetensors file is a FIFO \(named pipe\)"):
        resolve("m", str(only))

    second = tmp_path / "second-fifo"
    write_model(second, {"w": torch.zeros(4, 4)})
    os.rename(second / "model.safetensors", second / "model-1.safetensors")
    os.mkfifo(second / "model-2.safetensors")
    with pytest.raises(LineageError, match=r"model-2.safetensors: safetensors file is a FIFO"):
        resolve("m", str(second))

    idx = tmp_path / "index-fifo"
    write_model(idx, {"w": torch.zeros(4, 4)})
    os.mkfifo(idx / "model.safetensors.index.json")
    with pytest.raises(LineageError, match=r"model.safetensors.index.json: index is a FIFO"):
        resolve("m", str(idx))

    os.mkfifo(tmp_path / "bare.fifo")
    with pytest.raises(LineageError, match="is a FIFO \\(named pipe\\), not a safetensors file or a model folder"):
        resolve("m", str(tmp_path / "bare.fifo"))

    sock_dir = tmp_path / "dev"
    sock_dir.mkdir()
    os.symlink("/dev/zero", sock_dir / "model.safetensors")
    with pytest.raises(LineageError, match="links outside the model folder"):
        resolve("m", str(sock_dir))


def test_fifo_candidate_through_the_command_line(tmp_path, small):
    """A candidate folder whose only shard is a FIFO: exit 2 with one line, at once."""
    _, sus = small
    bad = tmp_path / "fifo-model"
    bad.mkdir()
    os.mkfifo(bad / "model.safetensors")
    conf = model_set_file(
        tmp_path / "conf",
        "f",
        f"name: f\nsuspects:\n  - {{name: s, source: {sus}}}\ncandidates:\n  - {{name: c, source: {bad}}}\n",
    )
    p = audit("--config-dir", str(conf), "model_set=f", f"output_dir={tmp_path / 'o'}", timeout=60)
    assert p.returncode == 2
    assert (
        one_error_line(p)
        == f"lineage: error: {bad / 'model.safetensors'}: safetensors file is a FIFO (named pipe), not a regular file"
    )


def test_hostile_config_json_is_skipped_with_a_warning(tmp_path):
    """config.json as a FIFO, with a negative, infinite or absurd field, or nested
    100,000 deep: the head size is None with a reason, never a hang or a crash."""
    cases = {
        "fifo": None,
        "negative": '{"hidden_size": 64, "num_attention_heads": -4}',
        "infinite": '{"head_dim": 1e400}',
        "huge": '{"head_dim": 1e20}',
        "string": '{"hidden_size": "64", "num_attention_heads": 4}',
        "deep": "[" * 100_000 + "]" * 100_000,
        "not divisible": '{"hidden_size": 64, "num_attention_heads": 5}',
    }
    for name, text in cases.items():
        d = tmp_path / name.replace(" ", "-")
        d.mkdir()
        if text is None:
            os.mkfifo(d / "config.json")
        else:
            (d / "config.json").write_text(text)
        hd, why = head_dim(d)
        assert hd is None and why, name
        assert str(d / "config.json") in why, (name, why)
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "config.json").write_text('{"hidden_size": 384, "num_attention_heads": 12}')
    assert head_dim(ok) == (32, None)
    (ok / "config.json").write_text('{"hidden_size": 2048, "num_attention_heads": 32, "head_dim": 128}')
    assert head_dim(ok) == (128, None)  # stated, as Qwen3 does: not hidden / heads


def test_permutation_search_with_a_fifo_config_warns_and_finishes(tmp_path):
    """The attention-head search reads config.json; a FIFO there skips the search
    with a warning in the verdict instead of blocking the reducer forever."""
    real = load_file(str(MINILM))
    g = torch.Generator().manual_seed(1)
    out = dict(real)
    for k in real:  # every layer's heads permuted (12 heads of 32)
        if k.endswith("attention.self.query.weight"):
            pre = k[: -len("self.query.weight")]
            p = torch.randperm(12, generator=g)
            idx = (p[:, None] * 32 + torch.arange(32)).flatten()
            for n in ("query", "key", "value"):
                out[f"{pre}self.{n}.weight"] = real[f"{pre}self.{n}.weight"][idx]
            out[pre + "output.dense.weight"] = real[pre + "output.dense.weight"][:, idx]
    sus = write_model(tmp_path / "heads", out)
    os.mkfifo(sus / "config.json")
    cand = write_model(tmp_path / "cand", real)
    os.mkfifo(cand / "config.json")
    (v,) = run_local(ModelSet.from_dict(modelset({"s": sus}, {"c": cand})), tmp_path / "o")
    assert any("attention heads not searched" in w and "config.json: config.json is a FIFO" in w for w in v["warnings"])
    # the invariant products, sums over heads, need no head size here (as many key as query rows):
    # they see through the permutation all the same
    assert v["verdict"] == "identical" and "Q/K heads transformed or permuted" in v["undone"]


def test_index_with_hostile_values(tmp_path, small):
    cand, _ = small
    d = tmp_path / "obj"
    write_model(d, {"w": torch.zeros(4, 4)})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": {"evil": 1}}}))
    with pytest.raises(LineageError, match=r"\[w\]: shard \{'evil': 1\} is not a file name"):
        resolve("m", str(d))
    (d / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LineageError, match="unreadable index"):
        resolve("m", str(d))


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("suspect\n", "must be letters"),
        ("x" * 250, "is 250 characters long; the limit is 100"),
        ("../../x", "must be letters"),
        ("", "must be letters"),
        ("a\x1b[31m", "must be letters"),
    ],
)
def test_bad_names_are_refused_in_one_place(name, message):
    with pytest.raises(LineageError, match=message):
        ModelSet.from_dict(modelset({name: "/x"}, {"c": "/y"}))
    with pytest.raises(LineageError, match=message):
        ModelSet.from_dict(modelset({"s": "/x"}, {"c": "/y"}, name=name))


def test_model_set_types_are_checked():
    with pytest.raises(LineageError, match="suspects must be a list of \\{name, source\\} entries, got int"):
        ModelSet.from_dict({"name": "m", "suspects": 3, "candidates": [{"name": "c", "source": "/y"}]})
    with pytest.raises(LineageError, match="base must be true or false"):
        ModelSet.from_dict({"name": "m", "suspects": [{"name": "s", "source": "/x"}], "candidates": [{"name": "c", "source": "/y", "base": "yes"}]})  # fmt: skip


def test_model_set_named_like_a_path_writes_nothing_outside(tmp_path, small):
    """A model set whose `name` is `../../x` would send the default output_dir two
    levels up: refused (exit 2) before anything is written."""
    cand, sus = small
    conf = model_set_file(
        tmp_path / "conf",
        "evil",
        f"name: ../../x\nsuspects:\n  - {{name: s, source: {sus}}}\ncandidates:\n  - {{name: c, source: {cand}}}\n",
    )
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    p = audit("--config-dir", str(conf), "model_set=evil", cwd=work, timeout=60)
    assert p.returncode == 2
    assert "model set name '../../x' must be letters" in one_error_line(p)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a", "c", "conf", "s"] and not list(work.iterdir())


@pytest.mark.slow
def test_tensor_names_with_control_characters_are_printed_escaped(tmp_path, small):
    cand, _ = small
    evil = "w\n\x1b[31mlineage: error: forged"
    raw_safetensors(tmp_path / "bad" / "model.safetensors", {evil: {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    conf = model_set_file(
        tmp_path / "conf",
        "e",
        f"name: e\nsuspects:\n  - {{name: s, source: {tmp_path / 'bad'}}}\ncandidates:\n  - {{name: c, source: {cand}}}\n",
    )
    p = audit("--config-dir", str(conf), "model_set=e", f"output_dir={tmp_path / 'o'}", "compute.num_cpus=1", timeout=120)
    assert p.returncode == 3  # a broken suspect: the others (none here) are audited
    line = one_error_line(p)
    assert "\x1b" not in p.stderr and "\\x1b[31m" in line and "w\\n" in line


# -- output folders ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, message",
    [
        ("file", "exists and is not a folder"),
        ("/proc/lineage-out", "lies under /proc, a kernel file system"),
        ("/sys/kernel/x", "lies under /sys, a kernel file system"),
        ("", "output_dir is empty"),
        ("under-a-file/out", "cannot be created (Not a directory)"),
    ],
)
def test_bad_output_dirs_are_refused_before_any_work(tmp_path, small, where, message):
    cand, sus = small
    conf = model_set_file(
        tmp_path / "conf",
        "o",
        f"name: o\nsuspects:\n  - {{name: s, source: {sus}}}\ncandidates:\n  - {{name: c, source: {cand}}}\n",
    )
    if where == "file":
        (tmp_path / "file").write_text("x")
        where = str(tmp_path / "file")
    elif where.startswith("under-a-file"):
        (tmp_path / "under-a-file").write_text("x")
        where = str(tmp_path / where)
    p = audit("--config-dir", str(conf), "model_set=o", f"output_dir={where}", timeout=60)
    assert p.returncode == 2 and message in one_error_line(p)


# -- files changed after planning, extreme values ---------------------------------------


def test_file_replaced_after_planning_is_not_read_at_old_offsets(tmp_path):
    """Same tensors, header 1 KB longer: the planned offsets would read other bytes
    (an exact copy would look unrelated). Every tensor of it becomes an error row."""
    g = torch.Generator().manual_seed(0)
    w = {f"w{i}": torch.randn(32, 32, generator=g) for i in range(3)}
    write_model(tmp_path / "c", w)
    write_model(tmp_path / "s", w)
    plan = plan_audit(ModelSet.from_dict(modelset({"s": tmp_path / "s"}, {"c": tmp_path / "c"}))).pack(1 << 30)
    from safetensors.torch import save_file

    save_file(w, str(tmp_path / "s" / "model.safetensors"), metadata={"pad": "x" * 1024})
    red = Reducer(plan, tmp_path / "out")
    for u in plan.units:
        red.add(run_unit(u, FitOptions(chunk_bytes=1 << 20)), u.uid)
    red.finish()
    (v,) = decide_all(plan, tmp_path / "out", local_runner(FitOptions()))
    rows = read_rows(tmp_path / "out", "s")
    assert {r["status"] for r in rows} == {"error"}
    assert all("file changed since the audit was planned (size" in r["reason"] for r in rows)
    assert v["verdict"] == "inconclusive"


def test_values_near_the_float64_limit_are_an_error_row_not_a_crash(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(32, 32, generator=g, dtype=torch.float64) for i in range(4)}
    sus = {k: v + 0.01 * torch.randn(32, 32, generator=g, dtype=torch.float64) for k, v in base.items()}
    sus["w3"] = sus["w3"] * 1e300  # finite, but its squares are not
    write_model(tmp_path / "c", base)
    write_model(tmp_path / "s", sus)
    (v,) = run_local(ModelSet.from_dict(modelset({"s": tmp_path / "s"}, {"c": tmp_path / "c"})), tmp_path / "o")
    rows = {r["tensor"]: r for r in read_rows(tmp_path / "o", "s")}
    assert rows["w3"]["status"] == "error" and "values too large for float64 statistics" in rows["w3"]["reason"]
    assert v["verdict"] == "derived" and "error: values too large for float64 statistics" in " ".join(v["coverage"]["skipped"])
