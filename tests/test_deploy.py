"""The deployment files: cluster.yaml through Ray's own validation, the KubeRay RayJob's shape."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_ray_validation():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # the head does no work
    assert any("pip install" in c and "lineage" in c for c in cfg["setup_commands"])
    bad = copy.deepcopy(cfg)
    bad["max_wrkers"] = 3
    with pytest.raises(Exception, match="max_wrkers"):
        validate_config(prepare_config(bad))


def test_rayjob_manifest():
    job = yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith("python -m jobs.audit ")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = spec["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
