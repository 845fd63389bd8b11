"""Models described by a manifest instead of files: plan at real scale without the bytes.

A manifest has the shape of a `model.safetensors.index.json` plus every
tensor's dtype and shape (see ../shared/manifests). Offsets are laid out as
safetensors would lay them out, in manifest order within each shard, so
planning, alignment and unit balancing see exactly the byte ranges a real
checkpoint of that layout has. The paths point nowhere: reading one raises.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from pathlib import Path

from lineage.dtypes import DTYPES
from lineage.errors import LineageError
from lineage.header import TensorEntry
from lineage.source import Model

SCHEME = "manifest://"


def load_manifest(name: str, path: str | Path) -> Model:
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LineageError(f"{p}: unreadable manifest ({e})") from None
    weight_map, specs = doc.get("weight_map"), doc.get("tensors")
    if not isinstance(weight_map, dict) or not isinstance(specs, dict):
        raise LineageError(f"{p}: a manifest needs 'weight_map' and 'tensors'")
    cursor: dict[str, int] = defaultdict(int)
    tensors = {}
    for key, shard in weight_map.items():
        spec = specs.get(key)
        if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES:
            raise LineageError(f"{p} [{key}]: missing or unknown dtype/shape")
        shape = tuple(int(d) for d in spec["shape"])
        nbytes = math.prod(shape) * DTYPES[spec["dtype"]].itemsize
        start = cursor[shard]
        cursor[shard] += nbytes
        tensors[key] = TensorEntry(key, f"{SCHEME}{p.name}/{shard}", spec["dtype"], shape, start, start + nbytes)
    return Model(name, f"{SCHEME}{p}", str(p.parent), tensors)
