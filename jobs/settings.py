"""The Hydra config, validated into one typed object at the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lineage.demo import materialize
from lineage.errors import LineageError
from lineage.modelset import ModelSet
from lineage.options import FitOptions
from lineage.remote import RemoteOptions
from lineage.screening import Screening

MB = 1 << 20


def prepare_path(value: object) -> Path:
    """output_dir as an absolute path; refused when empty (it would mean the current folder)."""
    if value is None or not str(value).strip():
        raise LineageError("output_dir is empty; name a folder for the results (output_dir=DIR)")
    return Path(str(value)).expanduser().absolute()


@dataclass(frozen=True)
class Compute:
    address: str | None  # None: attach if RAY_ADDRESS says so, else start an embedded Ray
    num_cpus: int | None  # embedded Ray only
    cpus_per_task: float
    gpus_per_task: float
    max_in_flight: int  # 0: twice the cluster's task slots


@dataclass(frozen=True)
class Settings:
    model_set: ModelSet
    output_dir: Path
    chunk_bytes: int
    sample_fraction: float
    unit_bytes: int
    max_item_bytes: int
    flush_rows: int
    wait_for_lock: bool
    compute: Compute
    remote: RemoteOptions
    screening: Screening

    @property
    def fit_options(self) -> FitOptions:
        """How each tensor is read and fitted (threads and device are set per worker)."""
        return FitOptions(
            chunk_bytes=self.chunk_bytes, sample_fraction=self.sample_fraction, base=self.model_set.base, remote=self.remote
        )

    @classmethod
    def from_cfg(cls, cfg: DictConfig, say=None) -> Settings:
        d = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(d, dict)
        cache = d.get("demo_cache")
        ms = ModelSet.from_dict(materialize(d["model_set"], Path(cache).expanduser() if cache else None, say))
        fit, plan, write, comp, hub = d["fit"], d["plan"], d["write"], d["compute"], d.get("hub") or {}
        bulk = d.get("bulk") or {}
        if not isinstance(bulk.get("screen_fraction", 0.02), (int, float)) or not 0 < bulk.get("screen_fraction", 0.02) <= 1:
            raise LineageError(f"config: bulk.screen_fraction must be in (0, 1], got {bulk.get('screen_fraction')!r}")
        for key, val in (
            ("fit.chunk_mb", fit["chunk_mb"]),
            ("plan.unit_mb", plan["unit_mb"]),
            ("plan.max_item_mb", plan["max_item_mb"]),
        ):
            if not isinstance(val, (int, float)) or val <= 0:
                raise LineageError(f"config: {key} must be a positive number, got {val!r}")
        if not isinstance(fit["sample_fraction"], (int, float)) or not 0 < fit["sample_fraction"] <= 1:
            raise LineageError(f"config: fit.sample_fraction must be in (0, 1], got {fit['sample_fraction']!r}")
        return cls(
            model_set=ms,
            output_dir=prepare_path(d.get("output_dir")),
            chunk_bytes=int(fit["chunk_mb"] * MB),
            sample_fraction=float(fit["sample_fraction"]),
            unit_bytes=int(plan["unit_mb"] * MB),
            max_item_bytes=int(plan["max_item_mb"] * MB),
            flush_rows=int(write["flush_rows"]),
            wait_for_lock=bool(write.get("wait_for_lock", False)),
            screening=Screening(int(bulk.get("screen_above", 4)), float(bulk.get("screen_fraction", 0.02))),
            remote=RemoteOptions(
                concurrency=max(1, int(hub.get("concurrency", 4))),
                retries=max(0, int(hub.get("retries", 6))),
                cache_dir=str(Path(hub["cache_dir"]).expanduser()) if hub.get("cache_dir") else None,
            ),
            compute=Compute(
                address=comp.get("address"),
                num_cpus=comp.get("num_cpus"),
                cpus_per_task=float(comp["cpus_per_task"]),
                gpus_per_task=float(comp["gpus_per_task"]),
                max_in_flight=int(comp["max_in_flight"]),
            ),
        )
