"""`python -m jobs.audit [model_set=NAME] [output_dir=DIR] [...]`: run one audit on Ray.

The driver reads headers, plans byte-balanced units, and keeps a bounded
number of them in flight (`ray.wait`); workers read their own tensor bytes
and return small statistics; the reducer writes each tensor's row as soon
as it is complete and decides the verdicts at the end. Only names, offsets
and statistics travel through Ray.

It starts an embedded Ray (`address="local"`: never one it happens to find
on the host) unless told to attach to a cluster (`RAY_ADDRESS`, set by
`ray job submit`, or `compute.address`), and shuts down only what it
started.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import hydra
import ray
from omegaconf import DictConfig, OmegaConf

from jobs.settings import Settings
from jobs.workers import Dispatcher
from lineage.audit import AuditPlan, Reducer, decide_all, plan_audit
from lineage.errors import LineageError, printable
from lineage.outdir import lock, prepare
from lineage.output import atomic_write_bytes
from lineage.plan import Unit, imbalance
from lineage.report import table

REPO = Path(__file__).resolve().parent.parent
#: Exit codes: 0 all audited; 1 Hydra config error; 2 bad input, nothing
#: audited (LineageError); 3 audit done but some suspects could not be opened;
#: 130 / 143 stopped by SIGINT / SIGTERM (a rerun resumes).
EXIT_SOME_FAILED = 3
#: How long an attached cluster may take to offer a node that can run a unit
#: (an autoscaler starting one) before the audit is refused.
SCHEDULE_WAIT_S = 600
#: Seconds between progress lines (and between checks of the units in flight).
PROGRESS_S = 5.0


class Stopped(BaseException):
    """SIGINT or SIGTERM: stop the workers and Ray, keep what is written, exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


log = logging.getLogger("lineage")
log.addHandler(logging.NullHandler())  # outside a run (no audit.log yet) log lines go nowhere, not to stderr


def say(msg: str) -> None:
    """Plain progress lines (Ray prefixes worker output, so the driver prints its own),
    also kept in OUTPUT_DIR/audit.log."""
    line = printable(msg)
    print(f"[lineage] {line}", flush=True)
    log.info(line)


def reachable(address: str, timeout: float = 5.0) -> str | None:
    """None when something listens at a Ray address (host:port or ray://host:port), else why not.

    A head that died without `ray stop` leaves its address behind, and
    ray.init would retry it for minutes; a quick TCP connect tells at once."""
    if address == "auto":
        return None  # Ray reads its own address file: the user asked for that
    u = urlparse(address if "://" in address else f"tcp://{address}")
    if not u.hostname or not u.port:
        return None
    try:
        with socket.create_connection((u.hostname, u.port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e)


def connect(s: Settings) -> bool:
    """Initialise Ray; True when this process started it (and must stop it)."""
    if ray.is_initialized():
        return False
    address = s.compute.address or os.environ.get("RAY_ADDRESS")
    if address:
        why = reachable(address)
        if why is not None:
            raise LineageError(
                f"Ray at {address} does not answer ({why}); start the cluster, or unset RAY_ADDRESS "
                "(and compute.address) to run on an embedded Ray"
            )
        ray.init(address=address, log_to_driver=True)
        return True
    # Workers must import `jobs` and `lineage`. The embedded Ray's processes inherit this
    # environment, so PYTHONPATH is set here rather than through a runtime_env, which would
    # keep Ray from using the workers it starts with the cluster (3.4 s here, per audit).
    paths = [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    # address="local": a new Ray of our own, never one whose address file another job left on the host
    ray.init(address="local", num_cpus=s.compute.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def check_resources(s: Settings, embedded: bool) -> None:
    """Refuse work no node can run: a unit asks for `cpus_per_task` CPUs and
    `gpus_per_task` GPUs on one node. An embedded Ray has all it will ever
    have; an attached cluster may be autoscaling, so it gets SCHEDULE_WAIT_S."""
    c = s.compute
    want = {"CPU": c.cpus_per_task, "GPU": c.gpus_per_task}
    deadline = time.monotonic() + (0 if embedded else SCHEDULE_WAIT_S)
    told = False
    while True:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(all(r.get(k, 0) >= v for k, v in want.items() if v > 0) for r in nodes):
            return
        if time.monotonic() >= deadline:
            have = ", ".join(f"{r.get('CPU', 0):g} CPU / {r.get('GPU', 0):g} GPU" for r in nodes) or "none"
            raise LineageError(
                f"compute asks {c.cpus_per_task:g} CPU and {c.gpus_per_task:g} GPU per unit, but no node has that "
                f"(nodes: {have}); lower compute.cpus_per_task, or use compute=local where there is no GPU"
            )
        if not told:
            say(f"waiting up to {SCHEDULE_WAIT_S}s for a node with {c.cpus_per_task:g} CPU and {c.gpus_per_task:g} GPU")
            told = True
        time.sleep(2)


class RayRunner:
    """Runs units on Ray, at most `max_in_flight` at a time, yielding each unit's results
    as it completes (lineage.audit.RunUnits); prints progress every few seconds."""

    def __init__(self, pool: Dispatcher, max_in_flight: int) -> None:
        self.pool = pool
        self.max_in_flight = max_in_flight
        self.peak_in_flight = 0

    def __call__(self, units: list[Unit], what: str = "refine") -> Iterator[tuple[Unit, list]]:
        pending = list(units)
        total = sum(u.nbytes for u in units)
        in_flight: dict = {}
        done_bytes, t0, last = 0, time.perf_counter(), 0.0
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
                    done_bytes += u.nbytes
                    yield u, ray.get(ref)
                now = time.perf_counter()
                if now - last > PROGRESS_S or not (pending or in_flight):
                    last = now
                    done = len(units) - len(pending) - len(in_flight)
                    say(
                        f"{what}: units {done}/{len(units)}  {done_bytes / 1e9:.2f}/{total / 1e9:.2f} GB  "
                        f"{done_bytes / 1e6 / max(now - t0, 1e-9):.0f} MB/s"
                    )
        finally:
            for ref in in_flight:  # interrupted: do not leave work running for nobody
                ray.cancel(ref, force=True)


def execute(plan: AuditPlan, s: Settings) -> list[dict]:
    """Run the plan's units on Ray, reduce them, then decide (refiners' work on Ray too)."""
    res = ray.cluster_resources()
    c = s.compute
    slots = int(res.get("GPU", 0) // c.gpus_per_task) if c.gpus_per_task else int(res.get("CPU", 1) // max(c.cpus_per_task, 1e-9))
    slots = max(1, min(slots, len(plan.units) or 1))
    max_in_flight = c.max_in_flight or 2 * slots
    pool = Dispatcher(c.cpus_per_task, c.gpus_per_task, s.fit_options, n_actors=slots)
    if pool.actors:
        info = pool.describe()
        say(
            f"{len(info)} fit actors, {c.gpus_per_task:g} GPU each: "
            + ", ".join(f"gpu {','.join(i['gpu_ids'])} -> {i['device']}" for i in info)
        )
    runner = RayRunner(pool, max_in_flight)
    reducer = Reducer(plan, s.output_dir, s.flush_rows)
    try:
        try:
            for u, results in runner(plan.units, "fit"):
                reducer.add(results, u.uid)
        finally:
            reducer.writer.close()  # complete rows reach the disk even when interrupted
        reducer.finish()
        verdicts = decide_all(plan, s.output_dir, lambda units: runner(units, "refine"), s.unit_bytes)
    finally:
        pool.close()
    say(
        f"driver: at most {runner.peak_in_flight} units in flight (cap {max_in_flight}), at most {reducer.writer.max_buffered} rows buffered (flush at {s.flush_rows})"
    )
    return verdicts


def run(s: Settings, record: dict[str, str] | None = None) -> list[dict]:
    """The audit of `s`, holding `s.output_dir`'s lock throughout; `record`: files
    (name -> text) written into output_dir once it is checked (the run's config)."""
    out = prepare(s.output_dir)
    with lock(out, wait=s.wait_for_lock, say=say), audit_log(out):
        for name, text in (record or {}).items():
            atomic_write_bytes(out / name, text.encode())
        return _run(s)


@contextmanager
def audit_log(out: Path):
    """The driver's log lines (what `say` prints, warnings, errors) appended to OUTPUT_DIR/audit.log."""
    h = logging.FileHandler(out / "audit.log", encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(h)
        h.close()


def _run(s: Settings) -> list[dict]:
    say(
        f"model set {s.model_set.name}: {len(s.model_set.suspects)} suspect(s), {len(s.model_set.candidates)} candidate(s) -> {s.output_dir}"
    )
    plan = plan_audit(s.model_set)  # headers only: bad input fails before Ray starts
    gc.freeze()  # the plan lives until the end: keep the collector from rescanning its millions of objects
    if plan.resume_from(s.output_dir, sample_fraction=s.sample_fraction, say=say):
        say(f"resuming: {len(plan.done)} of {len(plan.groups)} tensors already written in {s.output_dir}")
    for m in plan.suspects + plan.candidates:
        for w in m.warnings:
            say(f"warning: {w}")
    for name, err in plan.failed.items():
        say(f"error: suspect {name} cannot be audited: {err}")
    started = connect(s)
    trap_signals()  # ray.init installs its own SIGTERM handler (sys.exit): ours again
    try:
        check_resources(s, embedded=started and not (s.compute.address or os.environ.get("RAY_ADDRESS")))
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


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


def trap_signals() -> None:
    """SIGINT and SIGTERM raise Stopped in the main thread: `finally` blocks stop the
    workers and Ray, buffered rows are flushed, and main prints one line."""
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _stop)


def error(msg: object) -> None:
    print(f"lineage: error: {printable(msg)}", file=sys.stderr, flush=True)
    log.error(printable(msg))


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Validate the config, run, and map every ending to one line and an exit code."""
    trap_signals()
    out = cfg.get("output_dir")
    try:
        s = Settings.from_cfg(cfg)
        record = {".hydra/config.yaml": OmegaConf.to_yaml(cfg, resolve=False)}
        try:
            from hydra.core.hydra_config import HydraConfig

            record[".hydra/overrides.yaml"] = OmegaConf.to_yaml(HydraConfig.get().overrides.task)
        except ValueError:  # not under Hydra's main (tests compose configs)
            pass
        verdicts = run(s, record)
    except LineageError as e:
        error(e)
        sys.exit(LineageError.exit_code)
    except (Stopped, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        print(
            f"lineage: stopped by {signal.Signals(signum).name}; rows already written in {out} are kept, "
            "and rerunning the same command resumes from them",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + signum)
    failed = [v for v in verdicts if v.get("error")]
    for v in failed:
        error(v["error"])
    if failed:
        sys.exit(EXIT_SOME_FAILED)


if __name__ == "__main__":
    main()
