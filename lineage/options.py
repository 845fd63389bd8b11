"""How one tensor's comparison is read and fitted, in one typed place.

From the entry point (`fit.*` and `compute.*` settings) to the engines,
the same object travels: no loose positional parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lineage.remote import RemoteOptions

MB = 1 << 20


@dataclass(frozen=True)
class FitOptions:
    #: `fit.chunk_mb`: the working memory of one read, in bytes. An engine
    #: sizes its reads so that its buffers stay within it for up to nine
    #: sides (a suspect and the kernel's eight candidates): the torch
    #: engine's float64 columns, the C kernel's input (which it also caps at
    #: engines.kernel.KERNEL_VIEW_ELEMENTS per side, 2-4 MiB, past which
    #: larger reads gain nothing). Peak worker memory follows this number,
    #: not the model; results do not depend on it beyond the last bits.
    chunk_bytes: int = 64 * MB
    #: `fit.sample_fraction`: the fraction of each tensor's row blocks read.
    sample_fraction: float = 1.0
    #: Kernel threads: the CPUs a worker was given (`compute.cpus_per_task`).
    #: The result does not depend on it.
    threads: int = 1
    #: "cpu", or "cuda" on a GPU actor (torch engine, float64, TF32 off).
    device: str = "cpu"
    #: The declared base: put first among the stored columns, so the
    #: statistics that are kept relative to the first (dropped-delta energy)
    #: are relative to it.
    base: str | None = None
    #: How remote (hub) bytes are fetched: concurrency, retries, the fetch cache.
    remote: RemoteOptions = field(default_factory=RemoteOptions)

    def with_(self, **kw: object) -> FitOptions:
        return replace(self, **kw)  # type: ignore[arg-type]
