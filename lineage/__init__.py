"""lineage: audit model provenance tensor by tensor.

A plain library (no Ray, no Hydra): sources and headers, layouts and
alignment, the streaming per-tensor fit, verdicts and output writers. The
Ray jobs in `jobs/` only orchestrate these functions.
"""

__version__ = "0.1.0"
