"""Ray Train's torch process group, kept on loopback when the Ray node is the local loopback instance.

Why: Ray Train's Torch backend gives torch.distributed the node's IP as the rendezvous address (127.0.0.1
for this project's local instance, :mod:`stfpm_ray.ray.session`), but torch's ``TCPStore`` server listens on
every interface whatever that address (``*:PORT`` in ``ss -ltnp``, even with one worker), and gloo binds the
interface its host name resolves to. A local ``train`` promised loopback only. So on a node whose IP is
loopback this backend makes the process group itself: rank 0 binds the store's socket to 127.0.0.1 and
hands it to ``TCPStore`` (``master_listen_fd``), and gloo is pointed at the loopback interface
(``GLOO_SOCKET_IFNAME=lo``, PyTorch's documented switch; ``NCCL_SOCKET_IFNAME=lo`` for NCCL on GPUs, not
measured here). On a cluster node it is Ray's backend, unchanged.

It builds on Ray Train's Torch backend internals (Ray 2.52 to 2.60); a Ray that moved them gets its own
backend and a warning that local training may listen beyond loopback.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig

try:  # private Ray Train pieces of the Torch backend, present in the Ray versions this project supports
    from ray.train._internal.utils import get_address_and_port
    from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend
except ImportError:  # pragma: no cover - a later Ray moved them; see loopback_torch_config
    _TorchBackend = None

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "::1", "localhost")
LOOPBACK_INTERFACE = "lo"


def _loopback_process_group(backend: str, rank: int, world_size: int, port: int, timeout_s: int) -> None:
    """In each worker: the process group over a store that rank 0 serves on 127.0.0.1 only."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_INTERFACE)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", LOOPBACK_INTERFACE)  # NCCL's bootstrap sockets, on GPUs
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = timedelta(seconds=timeout_s)
    listen_fd = None
    if rank == 0:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(128)
        listen_fd = server.detach()  # the store owns the socket from here on
    store = dist.TCPStore(
        "127.0.0.1", port, world_size, is_master=rank == 0, timeout=timeout, master_listen_fd=listen_fd
    )
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


if _TorchBackend is not None:

    class _LoopbackTorchBackend(_TorchBackend):
        """Ray's Torch backend, except that a loopback node's process group stays on loopback."""

        def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
            address, port = worker_group.execute_single(0, get_address_and_port)
            if address not in LOOPBACK:
                super().on_start(worker_group, backend_config)
                return
            gpus = worker_group.get_resources_per_worker().get("GPU", 0)
            backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
            worker_group.execute(_set_torch_distributed_env_vars)
            size = len(worker_group)
            # all at once: rank 0's store waits for every rank, and the others retry until it listens
            ray.get(
                [
                    worker_group.execute_single_async(
                        rank, _loopback_process_group, backend, rank, size, port, backend_config.timeout_s
                    )
                    for rank in range(size)
                ]
            )

    class _LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self) -> type:
            return _LoopbackTorchBackend


def loopback_torch_config() -> TorchConfig:
    """The ``torch_config`` for every ``TorchTrainer`` of this project (see the module doc)."""
    if _TorchBackend is None:
        log.warning("this Ray version's Torch backend is unknown: local training may listen beyond loopback")
        return TorchConfig()
    return _LoopbackTorchConfig()
