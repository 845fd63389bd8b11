from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The demo trio, built once for the whole session."""
    from lineage.demo import ensure

    return ensure(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray instance shared by every test that needs it."""
    import ray

    repo = str(Path(__file__).resolve().parent.parent)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": repo}})
    yield ray
    ray.shutdown()
