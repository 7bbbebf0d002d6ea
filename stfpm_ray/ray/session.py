"""Connecting to Ray: an existing cluster by address, or a local instance started in-process.

The local default binds loopback only, so a demo on a laptop or CI machine never opens ports on the
network. Ray decides that from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, which it reads once, when ``ray`` is
first imported: setting the variable at ``init`` time (after the import) is too late for this process, so
the local branch also sets the constant Ray read from it, and the variable for the processes Ray spawns.
Those are this project's only touches of Ray's private modules, imported here in one guarded place.
"""

from __future__ import annotations

import logging
import os

import ray

try:  # private Ray modules, present in the Ray versions this project supports (2.52 to 2.60)
    from ray._private import ray_constants as _ray_constants
    from ray._private.state import state as _ray_state
except ImportError:  # pragma: no cover - a later Ray moved them; see the two users below
    _ray_constants = _ray_state = None

log = logging.getLogger(__name__)
LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
    _keep_on_loopback()
    log.info("starting a local Ray instance (use --address to join a cluster)")
    # The dashboard (on 127.0.0.1) also serves the state API that Ray Train polls for progress.
    ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)


def _keep_on_loopback() -> None:
    """Make the local instance this process is about to start bind 127.0.0.1 only (see the module doc)."""
    os.environ[LOOPBACK_VARIABLE] = "0"
    if _ray_constants is None or not hasattr(_ray_constants, "ENABLE_RAY_CLUSTER"):
        log.warning("this Ray version cannot be held to loopback here; set %s=0 before starting Python",
                    LOOPBACK_VARIABLE)
        return
    _ray_constants.ENABLE_RAY_CLUSTER = False


def autoscaler_max_resources() -> dict[str, float]:
    """The largest resources the autoscaler's configuration allows, or ``{}``.

    A private Ray API (``ray._private.state``); any failure, including the API moving in a later Ray, falls
    back to the current cluster resources.
    """
    try:
        return dict(_ray_state.get_max_resources_from_cluster_config() or {})
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
