"""`lineage certify --layers-per-task N`: the recipe rerun as Ray work, by layer ranges.

A 400B merge rerun by one mergekit process takes hours on one machine. The
recipe is split into sub-recipes over ranges of the suspect's layers
(lineage.certify.split_recipe: each a mergekit slice, every per-layer
parameter given as its value at those layers); each range is a Ray task
that runs mergekit into its own temporary folder on its node, compares
its tensors with the suspect's (layers renumbered; the embeddings, final
norm and head in the first range only) and returns only the per-tensor
rows. The driver sums them into the same certificate a single rerun
gives. The parents and the suspect must be readable at the same local
paths on every node (shared storage), as for the single rerun.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import ray
import yaml

from lineage.certify import compare_range, split_recipe, summarise, suspect_layers


@ray.remote(num_cpus=1)
def _range(exe: str, sub: dict, suspect: str, base: str | None, a: int, b: int) -> tuple[list, list] | str:
    """Rerun one layer range and compare it; the rows, or mergekit's complaint."""
    with tempfile.TemporaryDirectory(prefix="lineage-certify-") as d:
        cfg, out = Path(d) / "recipe.yaml", Path(d) / "out"
        cfg.write_text(yaml.safe_dump(sub, sort_keys=False))
        r = subprocess.run([exe, str(cfg), str(out), "--no-copy-tokenizer"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"layers [{a}, {b}): mergekit exit {r.returncode}: {(r.stderr or r.stdout)[-400:]}"
        return compare_range(out, Path(suspect), Path(base) if base else None, a, b, a == 0)


def rerun_by_ranges(exe: str, recipe: Path, suspect: Path, base: Path | None, per: int) -> dict | None:
    """The certificate's comparison from the recipe rerun in layer ranges of at most `per` layers."""
    cfg = yaml.safe_load(recipe.read_text())
    parts = split_recipe(cfg, suspect_layers(suspect), per)
    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, logging_level="ERROR")
    try:
        got = ray.get([_range.remote(exe, sub, str(suspect), str(base) if base else None, a, b) for a, b, sub in parts])
    finally:
        if started:
            ray.shutdown()
    rows, dist = [], []
    for g in got:
        if isinstance(g, str):
            print(f"{suspect.name}: {g}")
            return None
        rows += g[0]
        dist += g[1]
    cmp = summarise(rows, dist)
    cmp["ranges"] = [[a, b] for a, b, _ in parts]
    return cmp
