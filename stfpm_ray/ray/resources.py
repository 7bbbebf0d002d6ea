"""How a run sizes itself to the Ray cluster: scoring actors beside decoding tasks, training workers per category.

Sizing is done on the driver from the cluster's resources (or what the autoscaler can grow it to,
:func:`stfpm_ray.ray.session.cluster_capacity`) before anything starts, because the failure modes of a bad
size are silent: an actor pool that holds every CPU starves the decoding tasks and the dataset hangs, and a
category that needs more than the cluster has waits for ever. Both are refused here with the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from stfpm_ray.errors import UserError

# What one read-and-decode task reserves; the actor pool is sized to leave at least this free. Decoding
# costs less than the forward pass it feeds on CPU, so half a CPU per task keeps decoding ahead of a pool
# that holds the rest. A request that differs from the actors' also keeps Ray Data from fusing decoding
# into the actors (it fuses consecutive map stages whose resource requests are equal), which would
# serialise the two.
DECODE_CPUS = 0.5


def gpus_each(requested: float | None, capacity: Mapping[str, float]) -> float:
    """GPUs per training worker or scoring actor: a number as given; ``auto`` (None) one GPU each when the
    cluster reports a GPU, else 0.

    GPUs are what the users' nodes have and a forward pass there is tens of times a CPU's, so a run on a GPU
    node uses them without a flag; the same command still runs on a CPU-only cluster (and in tests).
    """
    if requested is not None:
        return requested
    return 1.0 if capacity.get("GPU", 0.0) >= 1 else 0.0


def parse_actors(text: str) -> tuple[int, int]:
    """``N`` (a fixed pool) or ``MIN,MAX`` (autoscaling) to ``(min, max)``."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1 or values[0] > values[-1]:
        raise UserError(f"--actors takes N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return values[0], values[-1]


def actor_pool_size(
    actors: int | tuple[int, int] | None,
    gpus_per_actor: float,
    cpus_per_actor: float,
    resources: Mapping[str, float],
) -> tuple[int, int]:
    """``(min, max)`` actors: the given pool, or 1 up to all that fit while a decoding task still has CPU.

    A pool that leaves no CPU for reading and decoding (or asks for GPUs the cluster lacks) would hang the
    dataset rather than fail, so it is refused here with the numbers.
    """
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    fits = int((cpus - DECODE_CPUS) // cpus_per_actor)
    if gpus_per_actor > 0:
        fits = min(fits, int(gpus // gpus_per_actor))
    pool = (1, fits) if actors is None else (actors, actors) if isinstance(actors, int) else actors
    if fits < 1 or pool[1] > fits:
        raise UserError(
            f"{pool[1]} scoring actors x ({cpus_per_actor:g} CPUs, {gpus_per_actor:g} GPUs) do not fit in the "
            f"cluster's {cpus:g} CPUs and {gpus:g} GPUs with {DECODE_CPUS:g} CPU left for reading and decoding, "
            "and the dataset would hang: lower --actors, --cpus-per-actor or --gpus-per-actor"
        )
    return pool


@dataclass(frozen=True)
class TrainResources:
    """How a training run uses the cluster (``stfpm-ray train`` and ``benchmark`` resource flags).

    ``storage_path`` holds Ray Train's run state (default ``CKPT_DIR/_ray``); multi-node clusters need
    storage every node reaches. ``max_failures`` restarts a category's workers from its last checkpoint.
    ``cpus_per_worker`` None sizes workers from the cluster, ``gpus_per_worker`` None (``auto``) takes a GPU
    per worker where the cluster has GPUs (:meth:`sized_for`).
    """

    workers_per_category: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    storage_path: str | None = None
    max_failures: int = 2

    def __post_init__(self) -> None:
        cpus = 1.0 if self.cpus_per_worker is None else self.cpus_per_worker
        gpus = 0.0 if self.gpus_per_worker is None else self.gpus_per_worker
        if self.workers_per_category < 1 or cpus <= 0 or gpus < 0 or self.max_failures < -1:
            raise UserError(
                "need workers per category >= 1, CPUs per worker > 0, GPUs per worker >= 0, max failures >= -1"
            )
        if self.workers_per_category > 1 and gpus % 1:
            # Ray would place two ranks of one category on one GPU, and NCCL refuses a group whose ranks
            # share a device ("Duplicate GPU detected") after the workers have started.
            raise UserError(
                f"--gpus-per-worker {gpus:g} with {self.workers_per_category} workers per category would put "
                "two data-parallel ranks on one GPU, which NCCL refuses: use whole GPUs per worker "
                "(fractions work with --workers-per-category 1)"
            )

    @property
    def gpus(self) -> float:
        """GPUs per worker once sized (:meth:`sized_for`); 0 before."""
        return self.gpus_per_worker or 0.0

    def sized_for(self, capacity: Mapping[str, float], categories: int, threads: int) -> TrainResources:
        """``auto`` GPUs resolved (:func:`gpus_each`); unset CPUs per worker: on CPUs, the ``threads`` the
        recipe trains with (TrainConfig), at most the cluster's CPUs; on GPUs, the cluster's CPUs shared among
        the workers that train at once.

        A CPU worker's arithmetic runs on the recipe's threads whatever it reserves (so that the result does
        not depend on the cluster), so it reserves as many: fewer would put more threads than cores on a busy
        node (OpenMP's spinning threads then train 2.8x slower, measured with two categories on 2 cores),
        more would leave cores idle that another category could use.
        """
        sized = replace(self, gpus_per_worker=gpus_each(self.gpus_per_worker, capacity))
        if sized.cpus_per_worker is not None:
            return sized
        workers, cpus = self.workers_per_category, capacity.get("CPU", 1.0)
        if sized.gpus == 0:
            return replace(sized, cpus_per_worker=float(max(1, min(threads, int(cpus // workers)))))
        at_once = min(cpus // workers, capacity.get("GPU", 0.0) // (workers * sized.gpus))
        at_once = max(1, min(categories, int(at_once)))
        return replace(sized, cpus_per_worker=float(max(1, int(cpus // (at_once * workers)))))


def category_concurrency(capacity: dict[str, float], resources: TrainResources) -> int:
    """How many categories the cluster holds at once; a category that never fits is an error."""
    workers = resources.workers_per_category
    need = {"CPU": workers * resources.cpus_per_worker, "GPU": workers * resources.gpus}
    fits = [math.floor(capacity.get(key, 0.0) / amount + 1e-9) for key, amount in need.items() if amount > 0]
    count = min(fits) if fits else 1
    if count < 1:
        have = {key: capacity.get(key, 0.0) for key in need}
        raise UserError(
            f"one category needs {need} ({workers} workers) but the Ray cluster has {have}; "
            "lower --workers-per-category, --cpus-per-worker or --gpus-per-worker"
        )
    return count
