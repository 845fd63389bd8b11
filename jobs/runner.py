"""Units on Ray: the fit, reduced as units complete, then the refiners' work.

At most `compute.max_in_flight` units are in flight (`ray.wait` with a
timeout, so progress is printed even while nothing completes); an
interrupted run cancels what is in flight, so no work runs for nobody.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import ray

from jobs.raysession import RaySession
from jobs.settings import Settings
from jobs.workers import Dispatcher
from lineage.audit import AuditPlan, Reducer, decide_all
from lineage.plan import Unit

#: Seconds between progress lines (and between checks of the units in flight).
PROGRESS_S = 5.0


class RayRunner:
    """Runs units on Ray, at most `max_in_flight` at a time, yielding each unit's results
    as it completes (lineage.audit.RunUnits); prints progress every few seconds."""

    def __init__(self, pool: Dispatcher, max_in_flight: int, say) -> None:
        self.pool = pool
        self.max_in_flight = max_in_flight
        self.peak_in_flight = 0
        self.say = say

    def __call__(self, units: list[Unit], what: str = "refine") -> Iterator[tuple[Unit, list]]:
        pending = list(units)
        progress = Progress(what, sum(u.nbytes for u in units), sum(tensors(u) for u in units), self.say)
        in_flight: dict = {}
        try:
            while pending or in_flight:
                while pending and len(in_flight) < self.max_in_flight:
                    u = pending.pop(0)
                    in_flight[self.pool.submit(u)] = u
                self.peak_in_flight = max(self.peak_in_flight, len(in_flight))
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=PROGRESS_S)
                for ref in ready:
                    u = in_flight.pop(ref)
                    self.pool.done(ref)
                    progress.add(u.nbytes, tensors(u))
                    yield u, ray.get(ref)
                progress.show(final=not (pending or in_flight))
        finally:
            progress.close()
            for ref in in_flight:  # interrupted: do not leave work running for nobody
                ray.cancel(ref, force=True)


def tensors(u: Unit) -> int:
    """Suspect tensors (or row ranges of them) a unit completes."""
    return sum(len(getattr(it, "gids", (0,))) for it in u.items)


class Progress:
    """Bytes and tensors done, rate and ETA: a tqdm bar on a terminal, a plain line every
    PROGRESS_S otherwise (logs of `ray job submit`, files, CI)."""

    def __init__(self, what: str, total_bytes: int, total_tensors: int, say) -> None:
        self.what, self.total, self.total_tensors, self.say = what, total_bytes, total_tensors, say
        self.done = self.tensors = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty() and total_bytes:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what, leave=False)

    def add(self, nbytes: int, tensors: int) -> None:
        self.done += nbytes
        self.tensors += tensors
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors")

    def show(self, final: bool = False) -> None:
        now = time.perf_counter()
        if self.bar is not None or not (final or now - self.last > PROGRESS_S):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.say(
            f"{self.what}: {self.tensors}/{self.total_tensors} tensors, {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB, "
            f"{rate / 1e6:.0f} MB/s" + ("" if final else f", ETA {eta:.0f} s" if eta != float("inf") else ", ETA unknown")
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.say(
                f"{self.what}: {self.tensors}/{self.total_tensors} tensors, {self.done / 1e9:.2f} GB in {time.perf_counter() - self.t0:.1f} s"
            )


class Workers:
    """The audit's workers as a `lineage.audit.RunUnits`, created on first use: Ray is
    waited for (or started) only when there is work, and the pool is sized then."""

    def __init__(self, session: RaySession, s: Settings, say) -> None:
        self.session, self.s, self.say = session, s, say
        self.pool: Dispatcher | None = None
        self.runner: RayRunner | None = None
        self.max_in_flight = 0

    def __call__(self, units: list[Unit], what: str = "refine") -> Iterator[tuple[Unit, list]]:
        if not units:
            return
        if self.runner is None:
            self._start(len(units))
        yield from self.runner(units, what)  # type: ignore[misc]

    def _start(self, n_units: int) -> None:
        self.session.ensure()
        res = ray.cluster_resources()
        c = self.s.compute
        slots = (
            int(res.get("GPU", 0) // c.gpus_per_task) if c.gpus_per_task else int(res.get("CPU", 1) // max(c.cpus_per_task, 1e-9))
        )
        slots = max(1, min(slots, n_units))
        self.max_in_flight = c.max_in_flight or 2 * slots
        self.pool = Dispatcher(c.cpus_per_task, c.gpus_per_task, self.s.fit_options, n_actors=slots)
        if self.pool.actors:
            info = self.pool.describe()
            self.say(
                f"{len(info)} fit actors, {c.gpus_per_task:g} GPU each: "
                + ", ".join(f"gpu {','.join(i['gpu_ids'])} -> {i['device']}" for i in info)
            )
        self.runner = RayRunner(self.pool, self.max_in_flight, self.say)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def fit(plan: AuditPlan, s: Settings, workers: Workers) -> Reducer:
    """Run the plan's units and reduce them as they complete; every complete row is
    written, also when interrupted."""
    reducer = Reducer(plan, s.output_dir, s.flush_rows)
    try:
        for u, results in workers(plan.units, "fit"):
            reducer.add(results, u.uid)
    finally:
        reducer.flush()
    reducer.finish()
    return reducer


def decide(plan: AuditPlan, s: Settings, workers: Workers) -> list[dict]:
    return decide_all(plan, s.output_dir, lambda units: workers(units, "refine"), s.unit_bytes)
