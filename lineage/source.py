"""Resolve a model `source` to its tensors, reading headers only.

A source is a local folder (one `.safetensors` file, or shards with a
`*.safetensors.index.json`), a single local file, `hf://ORG/NAME[@REV]`, or a
folder in an object store, `s3://BUCKET/PREFIX` or `gs://BUCKET/PREFIX`
(remote/objectstore.py).
The index is parsed and checked before any shard is opened (huggingface_hub's
rule): shard paths must be relative and stay inside the model folder, every
shard must exist, and every key must be in the shard the index names. A key
that a second shard also holds is taken from the shard the index names, with
a warning, as transformers does.

Pickle-based checkpoints (`.bin`, `.pt`, `.pth`) are refused, never opened:
unpickling a stranger's file runs their code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lineage.errors import LineageError
from lineage.files import MAX_INDEX_BYTES, inside, kind, read_small
from lineage.header import TensorEntry, read_header
from lineage.remote import OBJECT_SCHEMES

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Most tensors one model may have, over all its shards: 5x the largest real
#: checkpoints (Qwen3.5-397B in FP8 has 189,042, Kimi K2 139,644). Planning
#: costs about 35 s and 1.5 GB of driver memory per million tensors here.
MAX_TENSORS = 1_000_000
HF_SCHEME = "hf://"


@dataclass
class Model:
    """A resolved model: every tensor name mapped to its bytes on disk."""

    name: str
    source: str
    root: str
    tensors: dict[str, TensorEntry]
    warnings: list[str] = field(default_factory=list)
    #: For a hub source: the commit its revision resolved to, and each file's size and sha256/ETag.
    commit: str | None = None
    files: dict[str, dict] = field(default_factory=dict)

    def record(self) -> dict:
        """What `sources` in the verdict and audit.json say about this model."""
        d: dict = {"source": self.source}
        if self.commit:
            d["commit"] = self.commit
        if self.files:
            d["files"] = self.files
        return d

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def natural_key(s: str) -> list[object]:
    """Sort `shard-2` before `shard-10` (shard names are not always padded)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def resolve(name: str, source: str) -> Model:
    """Resolve `source` (see module docstring) into a `Model` named `name`."""
    trusted = None
    if source.startswith(HF_SCHEME):
        from lineage.remote.hub import resolve_hub

        return resolve_hub(name, source)
    if source.startswith(OBJECT_SCHEMES):
        from lineage.remote.objectstore import resolve_object

        return resolve_object(name, source)
    root = Path(os.path.expanduser(source))
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        trusted = root.parent.parent  # a Hugging Face cache snapshot: its files link to ../../blobs
    if root.is_file():
        if not root.name.endswith(".safetensors"):
            _refuse_or_unknown(root, [root])
        return _model(name, source, str(root.parent), [str(root)], None)
    if not root.is_dir():
        try:
            what = kind(os.stat(root).st_mode)
        except OSError:
            raise LineageError(f"{source}: no such file or folder (model {name})") from None
        raise LineageError(f"{source}: is {what}, not a safetensors file or a model folder (model {name})")
    return _from_folder(name, source, root, trusted)


def pick_shards(
    source: str, names: list[str], read_index, where: str, pickle_hint: str = ""
) -> tuple[list[str], dict[str, str] | None]:
    """(shards, weight map or None) of a remote model folder listing `names` (sorted naturally):
    its index, read by `read_index(name) -> (url, weight map)`, or every .safetensors file.
    Shared by the hub (remote/hub.py) and object stores (remote/objectstore.py); `where` ("in ORG/NAME at
    COMMIT", "under s3://...") places the folder in the messages."""
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        if "model.safetensors.index.json" not in indexes:
            raise LineageError(f"{source}: several index files ({', '.join(indexes)}); point the source at one model")
        indexes = ["model.safetensors.index.json"]
    weight_map = None
    if indexes:
        url, weight_map = read_index(indexes[0])
        shards = sorted(set(weight_map.values()), key=natural_key)
        present = set(names)
        for key, shard in weight_map.items():
            if shard not in present:
                raise LineageError(f"{url} [{key}]: shard {shard!r} is missing {where}")
    else:
        shards = [n for n in names if n.endswith(".safetensors")]
    if not shards:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise LineageError(
                f"{source}: only pickle checkpoints ({', '.join(pickles[:3])}); lineage never unpickles model files{pickle_hint}"
            )
        raise LineageError(f"{source}: no .safetensors files {where}")
    return shards, weight_map


def parse_hf(source: str) -> tuple[str, str | None]:
    """(repo_id, revision or None) of `hf://ORG/NAME[@REV]`."""
    spec = source[len(HF_SCHEME) :]
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")) or not spec.isprintable():
        raise LineageError(f"{source}: expected hf://ORG/NAME[@REVISION]")
    return repo_id, revision or None


def cached_snapshot(name: str, source: str) -> Model:
    """`hf://` resolved from the local Hugging Face cache alone (offline, or the hub unreachable).

    huggingface_hub stores files once in the repo's blobs/ and links them
    from snapshots/REV/: links may go up to the repo's cache folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, revision = parse_hf(source)
    try:
        root = Path(
            snapshot_download(
                repo_id=repo_id, revision=revision, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]
            )
        )
    except LocalEntryNotFoundError:
        raise LineageError(f"{source}: not in the local Hugging Face cache, and the hub cannot be reached") from None
    except (OSError, ValueError) as e:  # a broken cache entry
        raise LineageError(f"{source}: unreadable Hugging Face cache entry: {e}") from None
    m = _from_folder(name, source, root, root.parent.parent)
    m.commit = root.name
    return m


def _from_folder(name: str, source: str, root: Path, trusted: Path | None = None) -> Model:
    indexes = sorted(root.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        preferred = root / "model.safetensors.index.json"
        if preferred not in indexes:
            raise LineageError(
                f"{root}: several index files ({', '.join(p.name for p in indexes)}); point the source at one folder per model"
            )
        indexes = [preferred]
    if indexes:
        warnings: list[str] = []
        weight_map = read_index(indexes[0], root, warnings, trusted)
        shards = sorted(set(weight_map.values()), key=natural_key)
        model = _model(name, source, str(root), [str(root / s) for s in shards], weight_map)
        model.warnings[:0] = warnings
        return model
    files = sorted((p for p in root.iterdir() if p.name.endswith(".safetensors")), key=lambda p: natural_key(p.name))
    if not files:
        _refuse_or_unknown(root, list(root.iterdir()))
    for p in files:
        if not inside(p, trusted or root):
            raise LineageError(f"{p}: links outside the model folder ({os.path.realpath(p)}); copy the file in instead")
    return _model(name, source, str(root), [str(p) for p in files], None)


def _refuse_or_unknown(root: Path, files: list[Path]) -> None:
    pickles = [p.name for p in files if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise LineageError(
            f"{root}: only pickle checkpoints ({', '.join(sorted(pickles)[:3])}); lineage never unpickles "
            "model files (loading them runs arbitrary code). Convert them once, in a sandbox you trust, "
            "with `safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')` "
            "or use the safetensors revision the hub's conversion bot publishes"
        )
    raise LineageError(f"{root}: no .safetensors files found")


def read_index(index_path: Path, root: Path, warnings: list[str] | None = None, trusted: Path | None = None) -> dict[str, str]:
    """Parse and check a `model.safetensors.index.json`: name -> shard file name.

    Shard names must be relative and free of `..`; after following links
    they must stay inside `trusted` (default: the model folder itself).

    A key the index lists twice keeps its last shard (as `json` would), with
    a warning appended to `warnings`.
    """

    weight_map = parse_index(read_small(index_path, MAX_INDEX_BYTES, "index"), str(index_path), warnings)
    real_root = os.path.realpath(root)
    allowed = os.path.realpath(trusted) if trusted is not None else real_root
    checked: dict[str, str] = {}
    for key, shard in weight_map.items():
        if shard in checked:
            continue
        real = os.path.realpath(os.path.join(real_root, shard))
        if os.path.commonpath([real, allowed]) != allowed:
            raise LineageError(f"{index_path} [{key}]: shard {shard!r} links outside the model folder")
        if not os.path.isfile(real):
            what = kind(os.stat(real).st_mode) if os.path.exists(real) else "missing"
            raise LineageError(
                f"{index_path} [{key}]: shard {shard!r} is {what}" + ("" if what == "missing" else ", not a regular file")
            )
        checked[shard] = real
    return {k: str(v) for k, v in weight_map.items()}


def parse_index(raw: bytes, label: str, warnings: list[str] | None = None) -> dict[str, str]:
    """The weight map of an index's bytes: JSON, a non-empty object of tensor -> shard name,
    shard names relative and free of `..`. Where the shards are is the caller's to check."""

    def pairs(kv: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for k, v in kv:
            if k in out and warnings is not None and isinstance(v, str):
                warnings.append(f"{label} [{k}]: listed in {out[k]} and {v}; using {v}")
            out[k] = v
        return out

    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LineageError(f"{label}: unreadable index ({e})") from None
    except RecursionError:
        raise LineageError(f"{label}: unreadable index (JSON nested too deeply)") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LineageError(f"{label}: no 'weight_map' object")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise LineageError(f"{label} [{key}]: shard {shard!r} is not a file name")
        if os.path.isabs(shard) or ".." in Path(shard).parts or not shard.isprintable():
            raise LineageError(f"{label} [{key}]: shard path {shard!r} leaves the model folder")
    return weight_map


def _model(name: str, source: str, root: str, files: list[str], weight_map: dict[str, str] | None) -> Model:
    return assemble(name, source, root, {f: (os.path.relpath(f, root), read_header(f)) for f in files}, weight_map)


def assemble(name: str, source: str, root: str, headers: dict, weight_map: dict[str, str] | None) -> Model:
    """A Model from its shards' headers ({file: (shard name, Header)}) and its index, if any:
    a key the index does not list is not part of the model; a key also stored in another
    shard is taken from the one the index names, with a warning."""
    tensors: dict[str, TensorEntry] = {}
    warnings: list[str] = []
    for f, (shard, header) in headers.items():
        for key, entry in header.tensors.items():
            if weight_map is not None:
                listed = weight_map.get(key)
                if listed is None:
                    continue  # not in the index: not part of the model
                if os.path.normpath(listed) != os.path.normpath(shard):
                    warnings.append(f"{f} [{key}]: also stored here; using {listed} as the index says")
                    continue
            elif key in tensors:
                raise LineageError(f"{f} [{key}]: also in {tensors[key].path}; add a model.safetensors.index.json to say which")
            tensors[key] = entry
        if len(tensors) > MAX_TENSORS:
            raise LineageError(f"{root}: model {name} has {len(tensors)} tensors; the limit is {MAX_TENSORS}")
    if weight_map is not None:
        for key, shard in weight_map.items():
            if key not in tensors:
                raise LineageError(f"{root}/{shard} [{key}]: listed in the index but not in the shard")
    return Model(name, source, root, tensors, warnings)
