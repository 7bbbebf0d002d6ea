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
