"""A model's config.json, read as hostile input.

Only a few architecture numbers are used (the attention head size, to undo
permuted heads), and each is validated where it is read: a positive integer
within sane bounds, or the step that needs it is skipped with a warning that
names the file and the field. The file is read without blocking and with a
size cap (files.read_small), and JSON nested too deeply is an error, not a
crash.
"""

from __future__ import annotations

import json
from pathlib import Path

from lineage.errors import LineageError
from lineage.files import MAX_CONFIG_BYTES, read_small
from lineage.remote import OBJECT_SCHEMES, is_remote
from lineage.source import Model

#: Sane upper bounds: far above any published model, far below what breaks arithmetic.
MAX_HIDDEN = 1 << 20
MAX_HEADS = 1 << 16


def read_config(model: Model | str | Path) -> tuple[dict | None, str | None]:
    """(config.json as a dict, None), (None, why it is unusable), or (None, None) when absent.

    `model` is a resolved Model (local, or on the hub: its config.json is
    fetched, capped) or a local folder."""
    return read_json_beside(model, "config.json", MAX_CONFIG_BYTES)


def read_json_beside(model: Model | str | Path, name: str, cap: int) -> tuple[dict | None, str | None]:
    """A JSON object file beside a model's shards (config.json, tokenizer.json), read as hostile
    input: (the object, None), (None, why it is unusable), or (None, None) when absent."""
    root = model.root if isinstance(model, Model) else str(model)
    path: Path | str = Path(root) / name
    try:
        if is_remote(root):
            path = f"{root}/{name}"
            stat = model.files.get(name) if isinstance(model, Model) else None
            if root.startswith(OBJECT_SCHEMES):
                from lineage.remote.objectstore import read_object

                if stat is None:
                    return None, None
                raw = read_object(path, cap, (stat["size"], stat.get("mtime_ns", 0)), name)
            else:
                from lineage.remote.hub import read_beside

                raw = read_beside(root, name, stat.get("size") if stat else None, cap)
            if raw is None:
                return None, None
        else:
            if not Path(path).exists() and not Path(path).is_symlink():
                return None, None
            raw = read_small(path, cap, name)
        doc = json.loads(raw.decode("utf-8"))
    except LineageError as e:
        return None, str(e)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path}: not valid JSON ({e})"
    except RecursionError:
        return None, f"{path}: JSON nested too deeply"
    if not isinstance(doc, dict):
        return None, f"{path}: not a JSON object"
    return doc, None


def positive_int(doc: dict, field: str, upper: int, where: str) -> tuple[int | None, str | None]:
    """doc[field] as an int in [1, upper], or (None, why not)."""
    v = doc.get(field)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        return None, f"{where}: {field} = {v!r} is not a number"
    if v != int(v) or not 1 <= v <= upper:
        return None, f"{where}: {field} = {v!r} is not an integer in [1, {upper}]"
    return int(v), None


def head_dim(model: Model | str | Path) -> tuple[int | None, str | None]:
    """Rows per attention head: `head_dim` when the config states it (Qwen3 does, and it
    differs from hidden/heads), else hidden_size / num_attention_heads. (None, warning)
    when the config is absent (no warning) or its fields are not usable."""
    doc, why = read_config(model)
    if doc is None:
        return None, why
    root = model.root if isinstance(model, Model) else str(model)
    where = f"{root}/config.json"
    if "head_dim" in doc and doc["head_dim"] is not None:
        return positive_int(doc, "head_dim", MAX_HIDDEN, where)
    if "hidden_size" not in doc or "num_attention_heads" not in doc:
        return None, None
    hidden, why = positive_int(doc, "hidden_size", MAX_HIDDEN, where)
    if hidden is None:
        return None, why
    heads, why = positive_int(doc, "num_attention_heads", MAX_HEADS, where)
    if heads is None:
        return None, why
    if hidden % heads:
        return None, f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
    return hidden // heads, None
