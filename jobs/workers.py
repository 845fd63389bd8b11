"""How units reach workers: stateless CPU tasks, or long-lived GPU actors.

On CPU a unit is a Ray task (cheap to start, retried by Ray if its worker
dies). On GPU each worker is an actor that holds one GPU for the whole
audit, so CUDA initialises once per GPU rather than once per unit; Ray
restarts a dead actor and retries its unfinished calls. Both run
`lineage.work.run_unit`: the fit's items and, after it, the refiners'.
"""

from __future__ import annotations

import os

import ray

from lineage.options import FitOptions
from lineage.plan import Unit
from lineage.work import run_unit

RETRIES = 3


def pick_device(want_gpu: bool) -> str:
    """CUDA when this worker was given a GPU and one is visible; TF32 off."""
    import torch

    if want_gpu and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return "cuda"
    return "cpu"


def fit_unit(unit: Unit, opts: FitOptions) -> list:
    """The CPU task body (`opts.threads` kernel threads, one per CPU the task was given)."""
    return run_unit(unit, opts)


class FitActor:
    """One GPU (logical or real) held for the audit; runs the units sent to it."""

    def __init__(self) -> None:
        self.device = pick_device(True)

    def info(self) -> dict:
        return {"device": self.device, "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}

    def fit(self, unit: Unit, opts: FitOptions) -> list:
        return run_unit(unit, opts.with_(device=self.device))


class Dispatcher:
    """`submit(unit) -> ObjectRef` over tasks or an actor pool, same interface."""

    def __init__(self, cpus: float, gpus: float, opts: FitOptions, n_actors: int = 0) -> None:
        self.opts = opts.with_(threads=max(1, int(cpus)))
        self.actors: list = []
        self.load: dict[int, int] = {}
        self.owner: dict = {}
        if gpus > 0:
            cls = ray.remote(FitActor).options(num_cpus=cpus, num_gpus=gpus, max_restarts=RETRIES, max_task_retries=RETRIES)
            self.actors = [cls.remote() for _ in range(max(1, n_actors))]
            self.load = {i: 0 for i in range(len(self.actors))}
        else:
            self.task = ray.remote(fit_unit).options(num_cpus=cpus, max_retries=RETRIES, retry_exceptions=False)

    def describe(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors])

    def submit(self, unit: Unit):
        if not self.actors:
            return self.task.remote(unit, self.opts)
        i = min(self.load, key=self.load.__getitem__)
        ref = self.actors[i].fit.remote(unit, self.opts)
        self.load[i] += 1
        self.owner[ref] = i
        return ref

    def done(self, ref) -> None:
        i = self.owner.pop(ref, None)
        if i is not None:
            self.load[i] -= 1

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
