"""Connecting to Ray: an existing cluster by address, or a local instance started in-process.

The local default binds loopback only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes a single-node
instance use 127.0.0.1), so a demo on a laptop or CI machine never opens ports on the network.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (``auto``, ``ray://...`` or ``HOST:PORT``), or start a local instance.

    Does nothing when Ray is already initialised in this process (tests share one instance, and a job
    submitted with ``ray job submit`` is connected by Ray itself through ``RAY_ADDRESS``).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    log.info("starting a local Ray instance (use --address to join a cluster)")
    # The dashboard (on 127.0.0.1) also serves the state API that Ray Train polls for progress.
    ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)


def autoscaler_max_resources() -> dict[str, float]:
    """The largest resources the autoscaler's configuration allows, or ``{}``.

    The one call of a private Ray API in this project (``ray._private.state``, present in the Ray versions this project
    supports, 2.52 to 2.60); any failure, including the API moving in a later Ray, falls back to
    the current cluster resources.
    """
    try:
        from ray._private.state import state  # private: guarded, see the docstring

        return dict(state.get_max_resources_from_cluster_config() or {})
    except Exception:  # the autoscaler's view is optional; a static cluster has none
        log.debug("no autoscaler configuration; sizing from current cluster resources", exc_info=True)
        return {}


def cluster_capacity() -> dict[str, float]:
    """Resources the cluster has now or can grow to, for sizing pools and concurrency.

    An autoscaling cluster (``cluster.yaml``: GPU workers from 0) has no GPU when a job starts; sizing from
    ``ray.cluster_resources()`` alone would refuse the job before the autoscaler could add a node. Ray Train
    sizes itself from the autoscaler's configured maximum in the same way.
    """
    capacity = dict(ray.cluster_resources())
    maximum = autoscaler_max_resources()
    for key, value in maximum.items():
        capacity[key] = max(capacity.get(key, 0.0), float(value))
    return capacity
