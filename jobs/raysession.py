"""The Ray an audit runs on: attached to a cluster, or embedded and started here.

Without `RAY_ADDRESS` or `compute.address` the audit starts its own Ray
(`address="local"`: never one it happens to find on the host). Ray's start
costs seconds (2.3-3.4 s on two cores here), so a fresh audit starts it in
a background thread at once and plans (reads headers, aligns) meanwhile;
an audit into an output_dir that already holds one (a rerun, a resume)
starts it only when work needs it, so a rerun that finds every row written
and needs no refiner's work never starts Ray at all.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import ray

from jobs.settings import Settings
from lineage.errors import LineageError

REPO = Path(__file__).resolve().parent.parent
#: How long an attached cluster may take to offer a node that can run a unit
#: (an autoscaler starting one) before the audit is refused.
SCHEDULE_WAIT_S = 600


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


def check_resources(s: Settings, embedded: bool, say) -> None:
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


class _QuietThreadWarning(logging.Filter):
    """Ray warns that it sets no SIGTERM handler when started off the main thread; the
    audit handles SIGTERM itself, so that warning would only be noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


class RaySession:
    """Starts (or attaches to) Ray when asked, possibly ahead of time, and stops what it started.

    Ray is started from a thread of its own that lives until `stop`: Ray starts
    its processes with PR_SET_PDEATHSIG, which fires when the *thread* that
    started them ends, so a short-lived starter thread would take the GCS
    down with it. The driver's main thread plans meanwhile, then uses Ray
    normally once `ensure` has waited for the start."""

    def __init__(self, s: Settings, say, after_connect=None) -> None:
        self.s = s
        self.say = say
        self.after_connect = after_connect  # called in the main thread once Ray is up
        self.address = s.compute.address or os.environ.get("RAY_ADDRESS")
        self.started = False
        self.seconds = 0.0  # waited for Ray by the driver (not overlapped with its planning)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._checked = False

    def start_soon(self) -> None:
        """Begin connecting in the background (the driver plans meanwhile)."""
        if self._thread is not None or ray.is_initialized():
            return

        def owner() -> None:
            try:
                self.started = connect(self.s)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by ensure()
                self._error = e
            self._ready.set()
            self._stop.wait()
            if self.started:
                ray.shutdown()

        logging.getLogger("ray._private.worker").addFilter(_QuietThreadWarning())
        self._thread = threading.Thread(target=owner, name="lineage-ray", daemon=True)
        self._thread.start()

    def ensure(self) -> None:
        """Ray up and able to run a unit: wait for the background start, or start it now."""
        t0 = time.perf_counter()
        if not ray.is_initialized() or self._thread is not None:
            self.start_soon()
            if self._thread is not None:
                self._ready.wait()
            if self._error is not None:
                err, self._error = self._error, None
                raise err
        if self.after_connect is not None:
            self.after_connect()
        self.seconds += time.perf_counter() - t0
        if not self._checked:
            check_resources(self.s, embedded=self.started and not self.address, say=self.say)
            self._checked = True

    def stop(self) -> None:
        """Shut down the Ray this session started (in the thread that started it)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.started = False
