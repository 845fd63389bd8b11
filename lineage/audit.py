"""The audit without the cluster: plan it, reduce results, decide verdicts.

`plan_audit` resolves every model (headers only), aligns each suspect with
the candidates and packs the work into units. `Reducer` takes worker results
in any order, sums the row-range parts of a split tensor, writes each row as
soon as its tensor is complete, and finally reads the dataset back to decide
the verdicts. The Ray job in `jobs/audit.py` is the loop between the two;
`run_local` is the same loop in one process, for tests and debugging.

Resume: `output_dir/audit.json` records a fingerprint of the audit (model
set, every tensor's file, dtype, shape and offsets, and the declared base).
A run that finds rows in an output directory with the same fingerprint
keeps them, plans only the tensors that have no row yet, and produces the
same dataset as an uninterrupted run. A different fingerprint is refused:
results already written are never overwritten by another audit's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from lineage import __version__
from lineage.align import Group, align
from lineage.errors import LineageError
from lineage.files import MAX_CONFIG_BYTES, read_small
from lineage.layermap import map_layers
from lineage.modelset import ModelSet
from lineage.output import TensorWriter, atomic_write_bytes, check_parts, read_rows, write_verdicts
from lineage.plan import Unit, plan_units
from lineage.rows import ROWS_VERSION, tensor_row
from lineage.source import Model, resolve
from lineage.stats import Stats
from lineage.verdict import Z_SIG, Candidate, decide, unreadable
from lineage.views import Reader
from lineage.work import ItemResult, run_unit

log = logging.getLogger("lineage")
MANIFEST = "audit.json"
MAX_PERMUTATION_SEARCH = 512  # matrices read whole by the driver, at most


@dataclass
class AuditPlan:
    model_set: ModelSet
    suspects: list[Model]
    candidates: list[Model]
    groups: list[Group]  # all suspects' groups; the index is the gid
    unmatched: dict[str, dict[str, int]]  # suspect -> candidate -> unused candidate tensors
    units: list[Unit]
    seconds: float = 0.0
    done: set[int] = field(default_factory=set)  # gids whose rows an earlier run wrote
    failed: dict[str, str] = field(default_factory=dict)  # suspect -> why it could not be opened

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def pack(self, unit_bytes: int, min_units: int = 1, max_item_bytes: int | None = None) -> AuditPlan:
        """(Re)pack the groups not yet done into units, e.g. once the cluster's size is known."""
        t0 = time.perf_counter()
        todo = [g if gid not in self.done else None for gid, g in enumerate(self.groups)]
        self.units = plan_units(todo, unit_bytes, min_units, max_item_bytes)
        self.seconds += time.perf_counter() - t0
        return self

    def fingerprint(self, sample_fraction: float = 1.0) -> str:
        """What decides the results: the models' tensors, the model set, the sampling."""
        h = hashlib.sha256(f"sample={sample_fraction!r}|rows={ROWS_VERSION}".encode())
        ms = self.model_set
        h.update(json.dumps([ms.name, [(m.name, m.base) for m in ms.suspects + ms.candidates], sorted(self.failed)]).encode())
        for m in self.suspects + self.candidates:
            h.update(m.name.encode())
            for name in sorted(m.tensors):
                t = m.tensors[name]
                stamp = (t.stamp.size, t.stamp.mtime_ns) if t.stamp else None
                h.update(f"{name}|{Path(t.path).name}|{t.dtype}|{t.shape}|{t.start}|{t.end}|{stamp}".encode())
        return h.hexdigest()

    def resume_from(self, out_dir: Path, sample_fraction: float = 1.0, say=None) -> int:
        """Mark the tensors already written under `out_dir` as done; return how many.

        Writes the manifest on a fresh directory; refuses one that holds
        another audit. Part files that cannot be read back are moved to
        `quarantine/` (output.check_parts) and their tensors planned again.
        """
        path = Path(out_dir) / MANIFEST
        fp = self.fingerprint(sample_fraction)
        if path.exists():
            try:
                prev = json.loads(read_small(path, MAX_CONFIG_BYTES, MANIFEST))
                if not isinstance(prev, dict):
                    raise ValueError("not a JSON object")
            except (LineageError, ValueError, RecursionError) as e:
                raise LineageError(f"{path}: unreadable ({e}); move it away to start over") from None
            if prev.get("fingerprint") != fp:
                raise LineageError(
                    f"{out_dir}: holds the results of a different audit (model set {prev.get('model_set')!r} or its files changed); "
                    "choose another output_dir or delete this one"
                )
        else:
            stale = Path(out_dir) / "tensors"
            if stale.exists() and any(stale.rglob("*.parquet")):
                raise LineageError(f"{out_dir}: has tensors/ but no {MANIFEST}; choose another output_dir or delete it")
            doc = {"fingerprint": fp, "model_set": self.model_set.name, "lineage": __version__, "created": time.time()}
            atomic_write_bytes(path, json.dumps(doc, indent=2).encode())
        index = {(g.suspect, g.tensor): gid for gid, g in enumerate(self.groups)}
        for s in self.suspects:
            for tensor in check_parts(Path(out_dir), s.name, say):
                gid = index.get((s.name, tensor))
                if gid is not None:
                    self.done.add(gid)
        return len(self.done)


def plan_audit(ms: ModelSet, unit_bytes: int, min_units: int = 1, max_item_bytes: int | None = None) -> AuditPlan:
    """Resolve every model from its headers, align, and pack units.

    A candidate that cannot be opened stops the audit (every comparison
    needs it). A suspect that cannot be opened is recorded in `failed` and
    gets an `inconclusive` verdict carrying the error, so one broken upload
    does not block a bulk audit of the others.
    """
    t0 = time.perf_counter()
    candidates = [resolve(c.name, c.source) for c in ms.candidates]
    suspects, failed = [], {}
    for s in ms.suspects:
        try:
            suspects.append(resolve(s.name, s.source))
        except LineageError as e:
            failed[s.name] = str(e)
    groups: list[Group] = []
    unmatched = {}
    for s in suspects:
        gs, um = align(s, candidates)
        groups.extend(gs)
        unmatched[s.name] = {k: len(v) for k, v in um.items()}
    units = plan_units(groups, unit_bytes, min_units, max_item_bytes)
    return AuditPlan(ms, suspects, candidates, groups, unmatched, units, time.perf_counter() - t0, failed=failed)


@dataclass
class Reducer:
    """Merges item results into rows and streams them to the dataset."""

    plan: AuditPlan
    out_dir: Path
    flush_rows: int = 2000
    writer: TensorWriter = field(init=False)
    _parts: dict[int, list[ItemResult]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.writer = TensorWriter(self.out_dir, self.flush_rows)
        base = self.plan.model_set.base
        for gid, g in enumerate(self.plan.groups):
            if g.status != "ok" and gid not in self.plan.done:
                self.writer.add(g.suspect, tensor_row(g, None, base=base))

    def add(self, results: list[ItemResult], unit: int = -1) -> None:
        for r in results:
            parts = self._parts.setdefault(r.gid, [])
            parts.append(r)
            if len(parts) == r.parts:
                self._finish(r.gid, self._parts.pop(r.gid), unit)

    def _finish(self, gid: int, parts: list[ItemResult], unit: int) -> None:
        g = self.plan.groups[gid]
        errors = [p.error for p in parts if p.error]
        stats = None
        if not errors:
            stats = Stats.from_dict(parts[0].stats)  # type: ignore[arg-type]
            for p in sorted(parts[1:], key=lambda p: p.part):
                stats.merge(Stats.from_dict(p.stats))  # type: ignore[arg-type]
        self.writer.add(g.suspect, tensor_row(g, stats, errors[0] if errors else None, self.plan.model_set.base, unit))

    def finish(self) -> list[dict]:
        """Flush the rows, decide and write every verdict; return them."""
        self.writer.close()
        if self._parts:
            missing = sorted(self.plan.groups[g].tensor for g in self._parts)
            raise RuntimeError(f"incomplete tensors after all units: {missing[:5]}")
        cands = [Candidate(c.name, c.base) for c in self.plan.model_set.candidates]
        decided = {}
        for s in self.plan.suspects:
            rows = read_rows(self.out_dir, s.name)
            v = remap_layers(decide(s.name, rows, cands, self.plan.unmatched.get(s.name)), rows, s, self.plan.candidates)
            decided[s.name] = undo_permutations(v, rows, s, self.plan.candidates)
        decided |= {name: unreadable(name, err) for name, err in self.plan.failed.items()}
        verdicts = [decided[m.name] for m in self.plan.model_set.suspects]
        write_verdicts(self.out_dir, verdicts)
        return verdicts


def remap_layers(verdict: dict, rows: list[dict], suspect: Model, candidates: list[Model]) -> dict:
    """Add a layer map when the suspect's layers do not match their namesakes.

    For a `derived` verdict whose parent leaves some stack layer without a
    significant matrix, and for an `inconclusive` one where a candidate
    matches only part of the matrices, every suspect layer is compared with
    every candidate layer (sampled; `layermap.map_layers`). A mapping that
    is not the identity and covers every suspect layer is reported as
    `layer_map`; for an inconclusive verdict it makes the suspect `derived`
    from that candidate, the mapped correlations being the evidence.
    """
    by_name = {c.name: c for c in candidates}
    if verdict["verdict"] == "derived":
        targets = [verdict["parents"][0]["name"]]
    elif verdict["verdict"] == "inconclusive":
        targets = [n for n, e in verdict.get("evidence", {}).get("candidates", {}).items() if 0 < e["frac_significant"] < 0.5]
    else:
        return verdict
    for name in targets:
        if verdict["verdict"] == "derived" and not _unmatched_layers(rows, name):
            continue
        with Reader() as reader:
            lm = map_layers(suspect, by_name[name], reader)
        layers = {r["layer"] for r in rows if r["layer"] is not None and r["ndim"] >= 2}
        if lm is None or lm.is_identity or set(lm.mapping) != layers:
            continue
        verdict["layer_map"] = {str(i): j for i, j in sorted(lm.mapping.items())}
        text = ", ".join(f"{i}->{j}" for i, j in sorted(lm.mapping.items()))
        low = min(lm.corr.values())
        if verdict["verdict"] == "inconclusive":
            verdict["verdict"], verdict["parents"] = "derived", [{"name": name, "weight": 1.0, "ci95": [1.0, 1.0]}]
            verdict["explanation"] = (
                f"{suspect.name} derives from {name} with its layers rearranged: every suspect layer matches one "
                f"layer of {name} (suspect->parent {text}; correlation at least {low:.4f} on {', '.join(lm.roles)}), "
                "though few matrices match their namesakes."
            )
        else:
            verdict["explanation"] += f" Its layers map to {name}'s as {text} (correlation at least {low:.4f})."
        break
    return verdict


def undo_permutations(verdict: dict, rows: list[dict], suspect: Model, candidates: list[Model]) -> dict:
    """Report permuted MLP units and attention heads between a derived suspect and its parent.

    Runs when a `derived` suspect has matrices that do not match their
    namesakes in the parent (and no layer map explained them); each
    permutation found is undone and the correlation it restores reported
    under `permutation`.
    """
    if verdict["verdict"] != "derived" or verdict.get("layer_map"):
        return verdict
    name = verdict["parents"][0]["name"]
    corr = {
        r["tensor"]: c["corr"] or 0.0
        for r in rows
        if r["status"] == "ok" and r["ndim"] == 2
        for c in r["candidates"]
        if c["candidate"] == name and c["status"] == "ok"
    }
    ranked = sorted(corr.values())
    typical = ranked[int(0.9 * (len(ranked) - 1))] if ranked else 0.0  # what matched matrices reach; a median would
    # fall with many permuted ones. Far below it counts: permuted rows keep column structure, so a permuted matrix
    # can still be "significant" on its own.
    unmatched = [t for t, c in corr.items() if c < 0.5 * typical][:MAX_PERMUTATION_SEARCH]
    if not unmatched:
        return verdict
    from lineage import permute  # reads whole matrices with torch: only imported when needed

    parent = next(c for c in candidates if c.name == name)
    warns: list[str] = []
    with Reader() as reader:
        found = permute.find(suspect, parent, unmatched, reader, warns)
    if warns:
        verdict.setdefault("warnings", []).extend(warns)
    if found:
        verdict["permutation"] = [
            {
                "what": p.what,
                "tensors": p.tensors,
                "units": p.units,
                "corr_before": round(p.corr_before, 6),
                "corr_after": round(p.corr_after, 6),
            }
            for p in found
        ]
        explained = sum(len(p.tensors) for p in found)
        kinds = " and ".join(sorted({p.what for p in found}))
        verdict["explanation"] += (
            f" {explained} of its matrices had their {kinds} permuted ({len(found)} groups; an evasion that leaves "
            f"the function unchanged); undone, they correlate with {name} at {min(p.corr_after for p in found):.4f} "
            f"or more (before: {max(p.corr_before for p in found):.4f} at most)."
        )
    return verdict


def _unmatched_layers(rows: list[dict], cand: str) -> bool:
    """Some stack layer has no matrix significantly correlated with `cand`."""
    sig: dict[int, bool] = {}
    for r in rows:
        if r["status"] != "ok" or r["layer"] is None or r["ndim"] < 2:
            continue
        z = next((c["z"] for c in r["candidates"] if c["candidate"] == cand and c["status"] == "ok"), None)
        sig[r["layer"]] = sig.get(r["layer"], False) or (z is not None and z >= Z_SIG)
    return not all(sig.values())


def run_local(
    ms: ModelSet, out_dir: Path, chunk_bytes: int = 64 << 20, unit_bytes: int = 256 << 20, sample_fraction: float = 1.0
) -> list[dict]:
    """The whole audit in this process (no Ray), resuming what `out_dir` holds."""
    plan = plan_audit(ms, unit_bytes)
    plan.resume_from(Path(out_dir), sample_fraction)
    plan.pack(unit_bytes)
    red = Reducer(plan, Path(out_dir))
    for u in plan.units:
        red.add(run_unit(u, chunk_bytes, ms.base, sample_fraction=sample_fraction), u.uid)
    return red.finish()
