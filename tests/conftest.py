"""Shared fixtures: one Ray instance per test session, small synthetic and real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"


@pytest.fixture(scope="session")
def ray_session():
    """A local two-CPU Ray instance on loopback, shared by every test that needs Ray."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Three small synthetic categories (64 px), generated once per session."""
    from stfpm_ray.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, categories=3, size=64, n_train=16, n_test=10, seed=0)
    return root
