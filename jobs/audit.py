"""`python -m jobs.audit [model_set=NAME] [output_dir=DIR] [...]`: run one audit on Ray.

The driver reads headers, plans byte-balanced units, and keeps a bounded
number of them in flight (`ray.wait`); workers read their own tensor bytes
and return small statistics; the reducer writes each tensor's row as soon
as it is complete and decides the verdicts at the end. Only names, offsets
and statistics travel through Ray.

It starts an embedded Ray unless it finds one to attach to (`RAY_ADDRESS`,
set by `ray job submit`, or `compute.address`), and shuts down only what it
started.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
import ray
from omegaconf import DictConfig

from jobs.settings import Settings
from jobs.workers import Dispatcher
from lineage.audit import AuditPlan, Reducer, plan_audit
from lineage.errors import LineageError
from lineage.plan import imbalance
from lineage.report import table

REPO = Path(__file__).resolve().parent.parent
#: Exit codes: 0 all audited; 1 Hydra config error; 2 bad input, nothing
#: audited (LineageError); 3 audit done but some suspects could not be opened.
EXIT_SOME_FAILED = 3


def say(msg: str) -> None:
    """Plain progress lines; Ray prefixes worker output, so the driver prints its own."""
    print(f"[lineage] {msg}", flush=True)


def connect(s: Settings) -> bool:
    """Initialise Ray; True when this process started it (and must stop it)."""
    if ray.is_initialized():
        return False
    address = s.compute.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    # Workers must import `jobs` and `lineage`. The embedded Ray's processes inherit this
    # environment, so PYTHONPATH is set here rather than through a runtime_env, which would
    # keep Ray from using the workers it starts with the cluster (3.4 s here, per audit).
    paths = [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    ray.init(num_cpus=s.compute.num_cpus, include_dashboard=False)
    return True


def execute(plan: AuditPlan, s: Settings) -> list[dict]:
    """Run the plan's units on Ray, at most `max_in_flight` at a time, and reduce them."""
    res = ray.cluster_resources()
    c = s.compute
    slots = int(res.get("GPU", 0) // c.gpus_per_task) if c.gpus_per_task else int(res.get("CPU", 1) // max(c.cpus_per_task, 1e-9))
    slots = max(1, min(slots, len(plan.units) or 1))
    max_in_flight = c.max_in_flight or 2 * slots
    pool = Dispatcher(
        c.cpus_per_task, c.gpus_per_task, s.chunk_bytes, plan.model_set.base, n_actors=slots, sample_fraction=s.sample_fraction
    )
    if pool.actors:
        info = pool.describe()
        say(
            f"{len(info)} fit actors, {c.gpus_per_task:g} GPU each: "
            + ", ".join(f"gpu {','.join(i['gpu_ids'])} -> {i['device']}" for i in info)
        )
    reducer = Reducer(plan, s.output_dir, s.flush_rows)
    pending = list(plan.units)
    in_flight: dict = {}
    done_bytes, t0, last, peak_in_flight = 0, time.perf_counter(), 0.0, 0
    try:
        while pending or in_flight:
            while pending and len(in_flight) < max_in_flight:
                u = pending.pop(0)
                in_flight[pool.submit(u)] = u
            peak_in_flight = max(peak_in_flight, len(in_flight))
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                u = in_flight.pop(ref)
                pool.done(ref)
                reducer.add(ray.get(ref), u.uid)
                done_bytes += u.nbytes
            now = time.perf_counter()
            if now - last > 5 or not (pending or in_flight):
                last = now
                done = len(plan.units) - len(pending) - len(in_flight)
                say(
                    f"units {done}/{len(plan.units)}  {done_bytes / 1e9:.2f}/{plan.nbytes / 1e9:.2f} GB  {done_bytes / 1e6 / max(now - t0, 1e-9):.0f} MB/s"
                )
    finally:
        pool.close()
    verdicts = reducer.finish()
    say(
        f"driver: at most {peak_in_flight} units in flight (cap {max_in_flight}), at most {reducer.writer.max_buffered} rows buffered (flush at {s.flush_rows})"
    )
    return verdicts


def run(s: Settings) -> list[dict]:
    s.output_dir.mkdir(parents=True, exist_ok=True)
    say(
        f"model set {s.model_set.name}: {len(s.model_set.suspects)} suspect(s), {len(s.model_set.candidates)} candidate(s) -> {s.output_dir}"
    )
    plan = plan_audit(s.model_set, s.unit_bytes, 1, s.max_item_bytes)  # headers only: bad input fails before Ray starts
    if plan.resume_from(s.output_dir, sample_fraction=s.sample_fraction):
        say(f"resuming: {len(plan.done)} of {len(plan.groups)} tensors already written in {s.output_dir}")
    for m in plan.suspects + plan.candidates:
        for w in m.warnings:
            say(f"warning: {w}")
    for name, err in plan.failed.items():
        say(f"error: suspect {name} cannot be audited: {err}")
    started = connect(s)
    try:
        plan.pack(s.unit_bytes, 2 * max(1, int(ray.cluster_resources().get("CPU", 1))), s.max_item_bytes)
        say(
            f"plan: {len(plan.groups)} suspect tensors, {len(plan.units)} units, {plan.nbytes / 1e9:.2f} GB to read, "
            f"imbalance {imbalance(plan.units):.1%}, planned in {plan.seconds:.2f}s"
        )
        verdicts = execute(plan, s)
    finally:
        if started:
            ray.shutdown()
    print(table(verdicts), flush=True)
    say(f"wrote {s.output_dir}/tensors, verdicts.parquet, verdicts/*.json")
    return verdicts


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        verdicts = run(Settings.from_cfg(cfg))
    except LineageError as e:
        print(f"lineage: error: {e}", file=sys.stderr, flush=True)
        sys.exit(LineageError.exit_code)
    failed = [v for v in verdicts if v.get("error")]
    for v in failed:
        print(f"lineage: error: {v['error']}", file=sys.stderr, flush=True)
    if failed:
        sys.exit(EXIT_SOME_FAILED)


if __name__ == "__main__":
    main()
