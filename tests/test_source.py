"""Resolving sources: files, folders, shards with an index, the HF cache; hostile indexes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lineage.errors import LineageError
from lineage.source import resolve
from tests.common import write_model

W = {"model.a.weight": torch.randn(4, 3), "model.b.weight": torch.randn(6), "model.c.weight": torch.randn(2, 2)}


def test_single_file_and_folder(tmp_path):
    write_model(tmp_path / "m", W)
    by_folder = resolve("m", str(tmp_path / "m"))
    by_file = resolve("m", str(tmp_path / "m" / "model.safetensors"))
    assert set(by_folder.tensors) == set(by_file.tensors) == set(W)


def test_sharded_with_index(tmp_path):
    write_model(tmp_path / "m", W, shards=2)
    m = resolve("m", str(tmp_path / "m"))
    assert set(m.tensors) == set(W)
    assert len({t.path for t in m.tensors.values()}) == 2


def test_shards_sorted_naturally_without_index(tmp_path):
    from lineage.source import natural_key

    assert sorted(["s-10.safetensors", "s-2.safetensors"], key=natural_key) == ["s-2.safetensors", "s-10.safetensors"]


def _index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    "shard,msg",
    [
        ("../evil.safetensors", "leaves the model folder"),
        ("/etc/passwd", "leaves the model folder"),
        ("nope.safetensors", "is missing"),
    ],
)
def test_hostile_index_paths(tmp_path, shard, msg):
    write_model(tmp_path / "m", W, shards=2)
    _index(tmp_path / "m", {"model.a.weight": shard})
    with pytest.raises(LineageError, match=msg) as e:
        resolve("m", str(tmp_path / "m"))
    assert "model.safetensors.index.json [model.a.weight]" in str(e.value)


def test_symlink_leaving_folder(tmp_path):
    write_model(tmp_path / "outside", W)
    (tmp_path / "m").mkdir()
    os.symlink(tmp_path / "outside" / "model.safetensors", tmp_path / "m" / "model-1.safetensors")
    _index(tmp_path / "m", {k: "model-1.safetensors" for k in W})
    with pytest.raises(LineageError, match="links outside the model folder"):
        resolve("m", str(tmp_path / "m"))


def test_key_in_two_shards_follows_index(tmp_path):
    from safetensors.torch import save_file

    m = tmp_path / "m"
    m.mkdir()
    save_file({"x": torch.zeros(3), "z": torch.zeros(1)}, str(m / "a.safetensors"))
    save_file({"x": torch.ones(3), "y": torch.ones(2)}, str(m / "b.safetensors"))
    _index(m, {"x": "b.safetensors", "y": "b.safetensors", "z": "a.safetensors"})
    model = resolve("m", str(m))
    assert model.tensors["x"].path.endswith("b.safetensors")
    assert any("a.safetensors [x]: also stored here" in w for w in model.warnings)


def test_key_listed_twice_in_index(tmp_path):
    from safetensors.torch import save_file

    m = tmp_path / "m"
    m.mkdir()
    save_file({"x": torch.zeros(3)}, str(m / "a.safetensors"))
    save_file({"x": torch.ones(3)}, str(m / "b.safetensors"))
    text = '{"weight_map": {"x": "a.safetensors", "x": "b.safetensors"}}'
    (m / "model.safetensors.index.json").write_text(text)
    model = resolve("m", str(m))
    assert model.tensors["x"].path.endswith("b.safetensors")
    assert any("listed in a.safetensors and b.safetensors" in w for w in model.warnings)


def test_key_in_two_files_without_index_is_an_error(tmp_path):
    from safetensors.torch import save_file

    m = tmp_path / "m"
    m.mkdir()
    save_file({"x": torch.zeros(3)}, str(m / "a.safetensors"))
    save_file({"x": torch.ones(3)}, str(m / "b.safetensors"))
    with pytest.raises(LineageError, match=r"\[x\]: also in .*a.safetensors"):
        resolve("m", str(m))


def test_pickle_only_folder_refused_unopened(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "pytorch_model.bin").write_bytes(b"this would be a pickle; it must never be opened")
    os.chmod(m / "pytorch_model.bin", 0)  # unreadable: proves we never open it
    with pytest.raises(LineageError, match="never unpickles") as e:
        resolve("m", str(m))
    assert "safetensors.torch.save_file" in str(e.value)


def test_missing_source(tmp_path):
    with pytest.raises(LineageError, match="no such file or folder"):
        resolve("m", str(tmp_path / "nothing"))


def test_hf_source_from_local_cache(tmp_path, monkeypatch):
    """hf://ORG/NAME[@REV] resolves through huggingface_hub from the cache, offline."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny"
    # the real cache layout: files stored once in blobs/, linked from snapshots/REV/
    snap = write_model(repo / "snapshots" / commit, W, shards=2)
    (repo / "blobs").mkdir()
    for f in list(snap.iterdir()):
        blob = repo / "blobs" / f"blob-{f.name}"
        f.rename(blob)
        os.symlink(os.path.relpath(blob, snap), f)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    m = resolve("tiny", "hf://acme/tiny")
    assert set(m.tensors) == set(W) and commit in m.root
    m2 = resolve("tiny", f"hf://acme/tiny@{commit}")
    assert m2.root == m.root
    with pytest.raises(LineageError, match="not in the local Hugging Face cache"):
        resolve("x", "hf://acme/absent")
    with pytest.raises(LineageError, match="expected hf://ORG/NAME"):
        resolve("x", "hf://just-a-name")
