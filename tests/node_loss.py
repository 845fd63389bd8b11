"""Run the demo audit on a 3-node ray.cluster_utils.Cluster and remove a worker node mid-run.

Run as a script (its own process, its own Ray): `python -m tests.node_loss DEMO_CACHE OUT`.
Prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster


def main(cache: str, out: str) -> None:
    from jobs.audit import run
    from tests.test_pipeline import settings

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=1)
    doomed = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    removed = {}

    def remove_when_busy() -> None:
        parts = Path(out) / "tensors"
        deadline = time.time() + 120
        while time.time() < deadline and len(list(parts.glob("*/part-*.parquet"))) < 5:
            time.sleep(0.05)
        cluster.remove_node(doomed)
        removed["at_parts"] = len(list(parts.glob("*/part-*.parquet")))

    t = threading.Thread(target=remove_when_busy, daemon=True)
    t.start()
    s = settings([f"output_dir={out}", f"demo_cache={cache}", "write.flush_rows=1", "fit.chunk_mb=0.002", "plan.unit_mb=1"])
    verdicts = run(s)
    t.join(timeout=5)
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    print(json.dumps({"verdict": verdicts[0]["verdict"], "removed": removed, "alive_nodes": alive}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
