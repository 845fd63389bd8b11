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
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import ray
from omegaconf import DictConfig, OmegaConf

from jobs.raysession import RaySession
from jobs.runner import Workers, decide, fit
from jobs.settings import Settings
from lineage.audit import MANIFEST, log_run, plan_audit
from lineage.errors import LineageError, printable
from lineage.outdir import lock, prepare
from lineage.output import atomic_write_bytes
from lineage.plan import imbalance
from lineage.report import render, table
from lineage.screening import screen

REPO = Path(__file__).resolve().parent.parent
#: Exit codes: 0 all audited; 1 Hydra config error; 2 bad input, nothing
#: audited (LineageError); 3 audit done but some suspects could not be opened;
#: 130 / 143 stopped by SIGINT / SIGTERM (a rerun resumes).
EXIT_SOME_FAILED = 3


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
    session = RaySession(s, say, after_connect=trap_signals)
    if not (s.output_dir / MANIFEST).exists():
        session.start_soon()  # a fresh audit will need Ray: start it while the driver plans
    workers = Workers(session, s, say)
    phases: dict[str, float] = {}
    t = time.perf_counter()
    try:
        plan = plan_audit(s.model_set)  # headers only: bad input fails before any work
        gc.freeze()  # the plan lives until the end: keep the collector from rescanning its millions of objects
        for m in plan.suspects + plan.candidates:
            for w in m.warnings:
                say(f"warning: {w}")
        for name, err in plan.failed.items():
            say(f"error: suspect {name} cannot be audited: {err}")
        phases["plan"] = time.perf_counter() - t
        t = time.perf_counter()
        read_screening = screen(plan, s.output_dir, lambda units: workers(units, "screen"), s.screening, s.unit_bytes, say)
        phases["screen"] = time.perf_counter() - t
        if plan.resume_from(s.output_dir, sample_fraction=s.sample_fraction, say=say):
            say(f"resuming: {len(plan.done)} of {len(plan.groups)} tensors already written in {s.output_dir}")
        cpus = s.compute.num_cpus or os.cpu_count() or 1
        if session.address or ray.is_initialized() and not session.started:
            session.ensure()
            cpus = int(ray.cluster_resources().get("CPU", 1))
        plan.pack(s.unit_bytes, 2 * max(1, cpus), s.max_item_bytes)
        say(
            f"plan: {len(plan.groups)} suspect tensors, {len(plan.units)} units, {plan.nbytes / 1e9:.2f} GB to read, "
            f"imbalance {imbalance(plan.units):.1%}, planned in {plan.seconds:.2f}s"
        )
        t = time.perf_counter()
        reducer = fit(plan, s, workers)
        phases["fit"] = time.perf_counter() - t
        t = time.perf_counter()
        verdicts = decide(plan, s, workers)
        phases["decide"] = time.perf_counter() - t
    finally:
        workers.close()
        t = time.perf_counter()
        session.stop()
        phases["ray stop"] = time.perf_counter() - t
    phases["waiting for ray"] = session.seconds
    log_run(s.output_dir, bytes_screening=read_screening, bytes_fit=reducer.bytes_read, seconds=phases)
    print(table(verdicts), flush=True)
    if workers.runner is not None:
        say(
            f"driver: at most {workers.runner.peak_in_flight} units in flight (cap {workers.max_in_flight}), "
            f"at most {reducer.writer.max_buffered} rows buffered (flush at {s.flush_rows})"
        )
    say(f"read {(read_screening + reducer.bytes_read) / 1e9:.2f} GB; " + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()))
    t = time.perf_counter()
    try:
        report = render(s.output_dir, s.model_set.name).name
    except Exception as e:  # noqa: BLE001 - the report is a view of results already written: never lose them for it
        report = "no report.html"
        say(f"warning: report.html could not be written ({type(e).__name__}: {e}); `lineage report {s.output_dir}` retries")
    say(f"wrote {s.output_dir}/tensors, verdicts.parquet, verdicts/*.json, {report} ({time.perf_counter() - t:.2f}s)")
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


@hydra.main(config_path=str(REPO / "conf"), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Validate the config, run, and map every ending to one line and an exit code."""
    trap_signals()
    out = cfg.get("output_dir")
    try:
        s = Settings.from_cfg(cfg, say)
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
