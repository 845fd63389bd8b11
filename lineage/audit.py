"""The audit without the cluster: plan it, reduce results, decide verdicts.

`plan_audit` resolves every model (headers only) and aligns each suspect
with the candidates; `AuditPlan.pack` packs the work into units once the
number of workers is known. `Reducer` takes worker results in any order,
sums the row-range parts of a split tensor and writes each row as soon as
its tensor is complete. `decide_all` then reads each suspect's rows back
and decides its verdict (lineage/explain), running whatever work the
refiners ask for through the same `run_units` as the fit. The Ray job in
`jobs/audit.py` supplies Ray's `run_units`; `run_local` runs the same steps
in one process, for tests and debugging.

Resume: `output_dir/audit.json` records a fingerprint of the audit (model
set, every tensor's file, dtype, shape and offsets, and the declared base).
A run that finds rows in an output directory with the same fingerprint
keeps them, plans only the tensors that have no row yet, and produces the
same dataset as an uninterrupted run. A different fingerprint is refused:
results already written are never overwritten by another audit's.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lineage import __version__
from lineage.align import Group, align
from lineage.errors import LineageError
from lineage.explain import Candidate, Evidence, decide_with
from lineage.explain.base import unreadable
from lineage.files import MAX_CONFIG_BYTES, read_small
from lineage.modelset import ModelSet
from lineage.options import FitOptions
from lineage.outdir import lock, prepare
from lineage.output import TensorWriter, atomic_write_bytes, check_parts, write_verdicts
from lineage.plan import Unit, pack, plan_units
from lineage.recipe import render
from lineage.relations import RelationResult, Relations
from lineage.remote import OBJECT_SCHEMES
from lineage.rows import ROWS_VERSION, tensor_row
from lineage.screening import Screening, screen
from lineage.source import Model, resolve
from lineage.work import ItemResult, run_unit

log = logging.getLogger("lineage")
MANIFEST = "audit.json"


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
    screened: dict[str, dict] = field(default_factory=dict)  # suspect -> pool screening outcome (screening.py)

    def realign(self, kept: dict[str, list[str]]) -> None:
        """Align each suspect with only the candidates it keeps (after pool screening)."""
        by_name = {c.name: c for c in self.candidates}
        self.groups, self.unmatched = [], {}
        for s in self.suspects:
            gs, um = align(s, [by_name[n] for n in kept.get(s.name, list(by_name))])
            self.groups.extend(gs)
            self.unmatched[s.name] = {k: len(v) for k, v in um.items()}

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
        h.update(json.dumps(sorted((k, v["kept"]) for k, v in self.screened.items())).encode())
        for m in self.suspects + self.candidates:
            h.update(f"{m.name}|{m.commit}".encode())
            for name in sorted(m.tensors):
                t = m.tensors[name]
                stamp = (t.stamp.size, t.stamp.mtime_ns, t.stamp.etag) if t.stamp else None
                h.update(f"{name}|{Path(t.path).name}|{t.dtype}|{t.shape}|{t.start}|{t.end}|{stamp}".encode())
        return h.hexdigest()

    def sources(self) -> dict[str, dict]:
        """Each model's source as resolved: for the hub, its commit and every file's size and sha256."""
        return {m.name: m.record() for m in self.suspects + self.candidates}

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
                for m in self.suspects + self.candidates:
                    was = (prev.get("sources") or {}).get(m.name, {}).get("commit")
                    if was and m.commit and was != m.commit and m.source.startswith(OBJECT_SCHEMES):
                        raise LineageError(
                            f"{out_dir}: the objects under {m.source} changed (size or modification time) since this "
                            "output_dir was written; audit into a new output_dir"
                        )
                    if was and m.commit and was != m.commit:
                        raise LineageError(
                            f"{out_dir}: {m.source} has moved from commit {was} to {m.commit} since this output_dir was "
                            f"written; resume it with the commit pinned ({m.source.split('@')[0]}@{was}) or audit into a new output_dir"
                        )
                raise LineageError(
                    f"{out_dir}: holds the results of a different audit (model set {prev.get('model_set')!r} or its files changed); "
                    "choose another output_dir or delete this one"
                )
        else:
            stale = Path(out_dir) / "tensors"
            if stale.exists() and any(stale.rglob("*.parquet")):
                raise LineageError(f"{out_dir}: has tensors/ but no {MANIFEST}; choose another output_dir or delete it")
            doc = {
                "fingerprint": fp,
                "model_set": self.model_set.name,
                "lineage": __version__,
                "created": time.time(),
                "sources": self.sources(),
            }
            atomic_write_bytes(path, json.dumps(doc, indent=2).encode())
        index = {(g.suspect, g.tensor): gid for gid, g in enumerate(self.groups)}
        for s in self.suspects:
            for tensor in check_parts(Path(out_dir), s.name, say):
                gid = index.get((s.name, tensor))
                if gid is not None:
                    self.done.add(gid)
        return len(self.done)


def plan_audit(ms: ModelSet) -> AuditPlan:
    """Resolve every model from its headers and align; `AuditPlan.pack` then makes units.

    A candidate that cannot be opened stops the audit (every comparison
    needs it). A suspect that cannot be opened is recorded in `failed` and
    gets an `inconclusive` verdict carrying the error, so one broken upload
    does not block a bulk audit of the others.
    """
    with gc_paused():
        return _plan_audit(ms)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Planning a model of a million tensors makes millions of small acyclic objects, which
    Python's cyclic collector would rescan again and again (half the planning time at
    200,000 tensors): it is paused meanwhile (reference counting still frees everything)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _plan_audit(ms: ModelSet) -> AuditPlan:
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
    return AuditPlan(ms, suspects, candidates, groups, unmatched, [], time.perf_counter() - t0, failed=failed)


@dataclass
class Reducer:
    """Merges item results into rows and streams them to the dataset. It only
    reduces and writes: verdicts are decided afterwards (`decide_all`)."""

    plan: AuditPlan
    out_dir: Path
    flush_rows: int = 2000
    writer: TensorWriter = field(init=False)
    relations: Relations = field(default_factory=Relations, init=False)
    bytes_read: int = field(default=0, init=False)  # by the workers, each byte once (work.ItemResult.read)
    _parts: dict[int, list[ItemResult]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.writer = TensorWriter(self.out_dir, self.flush_rows)
        base = self.plan.model_set.base
        for gid, g in enumerate(self.plan.groups):
            if g.status != "ok" and gid not in self.plan.done:
                self.writer.add(g.suspect, tensor_row(g, None, base=base))

    def add(self, results: list, unit: int = -1) -> None:
        for r in results:
            if isinstance(r, RelationResult):
                self.relations.add(r)
                if len(self.relations.pending) >= self.flush_rows * 16:
                    self.relations.flush(self.out_dir)
                continue
            self.bytes_read += r.read
            parts = self._parts.setdefault(r.gid, [])
            parts.append(r)
            if len(parts) == r.parts:
                self._finish(r.gid, self._parts.pop(r.gid), unit)

    def _finish(self, gid: int, parts: list[ItemResult], unit: int) -> None:
        g = self.plan.groups[gid]
        errors = [p.error for p in parts if p.error]
        stats = None
        if not errors:
            ordered = sorted(parts, key=lambda p: p.part)
            stats = ordered[0].stats
            for p in ordered[1:]:
                stats.merge(p.stats)  # type: ignore[union-attr, arg-type]
        self.writer.add(g.suspect, tensor_row(g, stats, errors[0] if errors else None, self.plan.model_set.base, unit))

    def flush(self) -> None:
        """Every complete row and relation to disk (also when interrupted)."""
        self.writer.close()
        self.relations.flush(self.out_dir)

    def finish(self) -> None:
        """Flush the rows; every planned tensor must have been reduced."""
        self.flush()
        if self._parts:
            missing = sorted(self.plan.groups[g].tensor for g in self._parts)
            raise RuntimeError(f"incomplete tensors after all units: {missing[:5]}")


#: Runs units of work and yields (unit, its results): Ray in jobs/, in-process in run_local.
RunUnits = Callable[[list[Unit]], Iterator[tuple[Unit, list]]]


def run_items(items: list, run_units: RunUnits, unit_bytes: int, min_units: int = 1) -> list:
    """Results of work items (each with a `gid` = its index), in order: packed into units and run."""
    out: list = [None] * len(items)
    for unit, results in run_units(pack(items, unit_bytes, min_units)):
        for it, res in zip(unit.items, results):
            out[it.gid] = res
    return out


def decide_all(plan: AuditPlan, out_dir: Path, run_units: RunUnits, unit_bytes: int = 256 << 20) -> list[dict]:
    """Every suspect's verdict from its rows (the refiners' work run by `run_units`); written, returned."""
    cands = [Candidate(c.name, c.base) for c in plan.model_set.candidates]
    models = {m.name: m for m in plan.candidates}
    relations = Relations.load(out_dir)
    decided, recipes = {}, {}
    for s in plan.suspects:
        ev = Evidence.load(out_dir, s.name, cands, plan.unmatched.get(s.name), models | {s.name: s})
        v = decide_with(ev, lambda items: run_items(items, run_units, unit_bytes))
        if s.name in plan.screened:
            o = plan.screened[s.name]
            # a parent a refiner found under a disguise (which screening by name cannot see) is not listed
            named = {p["name"] for p in v.get("parents", [])}
            v["screened_out"] = [{"name": n, **o["candidates"].get(n, {})} for n in o["dropped"] if n not in named]
        if rel := relations.of(s.name):
            v["relations"] = rel
        v["sources"] = {m.name: m.record() for m in [s, *plan.candidates]}
        text = render(v, [t.dtype for t in s.tensors.values()])
        if text is not None:
            v["recipe"] = f"verdicts/{s.name}.recipe.yaml"
            recipes[s.name] = text
        decided[s.name] = v
    decided |= {name: unreadable(name, err) for name, err in plan.failed.items()}
    verdicts = [decided[m.name] for m in plan.model_set.suspects]
    write_verdicts(out_dir, verdicts, recipes)
    return verdicts


def log_run(out_dir: Path, **figures: object) -> None:
    """Append one run's figures (bytes read by phase, times) to audit.json's `runs`."""
    path = Path(out_dir) / MANIFEST
    try:
        doc = json.loads(read_small(path, MAX_CONFIG_BYTES, MANIFEST))
    except (LineageError, ValueError):
        return
    doc.setdefault("runs", []).append({"at": time.time(), **figures})
    atomic_write_bytes(path, json.dumps(doc, indent=2).encode())


def run_local(
    ms: ModelSet,
    out_dir: Path,
    opts: FitOptions | None = None,
    unit_bytes: int = 256 << 20,
    flush_rows: int = 2000,
    screening: Screening | None = None,
) -> list[dict]:
    """The whole audit in this process (no Ray), resuming what `out_dir` holds."""
    opts = (opts or FitOptions()).with_(base=ms.base)  # the declared base leads the stored columns, as on Ray
    out = prepare(out_dir)
    with lock(out):
        plan = plan_audit(ms)

        def run_units(units: list[Unit]) -> Iterator[tuple[Unit, list]]:
            for u in units:
                yield u, run_unit(u, opts)

        screened = screen(plan, out, run_units, screening or Screening(), unit_bytes)
        plan.resume_from(out, opts.sample_fraction)
        plan.pack(unit_bytes)
        red = Reducer(plan, out, flush_rows)
        for u, results in run_units(plan.units):
            red.add(results, u.uid)
        red.finish()
        log_run(out, bytes_screening=screened, bytes_fit=red.bytes_read)
        return decide_all(plan, out, run_units, unit_bytes)
