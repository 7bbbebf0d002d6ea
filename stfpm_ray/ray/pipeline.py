"""Ray Data around the core's scoring: decode tasks, an actor pool of scorers, write tasks.

Shaped by what costs what: decoding a large PNG takes tens of ms of one core, a GPU wants large batches,
and the object store should carry as few bytes as possible. So only paths enter the dataset (a block per
planned block), decoding runs in CPU tasks that ship uint8 pixels at model size
(:func:`stfpm_ray.data.plan.decode_block`), the actors ship PNG-encoded maps
(:func:`stfpm_ray.core.score.score_block`), and write tasks put Parquet files into the table folder for the
driver to publish (:mod:`stfpm_ray.store.publish`).

Defaults, and why:

* Actors take ``--cpus-per-actor 1`` (and as many torch threads), and the pool grows from 1 to as many
  actors as fit while ``DECODE_CPUS`` stays free: reading and decoding are Ray tasks that need CPU of their
  own, and a pool that holds every CPU starves them and the dataset hangs. On a 2-core machine that is one
  single-threaded actor beside the decoding tasks; a pool that cannot leave room for decoding is refused
  with a message instead of hanging.
* Fault tolerance: Ray Data creates scoring actors with ``max_restarts=-1`` and ``max_task_retries=-1``, so
  a scoring process that dies is restarted and its unfinished batches rerun (the manifest's ``workers``
  then lists both processes); Parquet files are named by run and write task, so a retried write replaces
  rather than duplicates, and the pre-commit check refuses to publish anything but one row per image.
"""

from __future__ import annotations

import functools
import os
import resource
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import torch
from ray.data import Datasink
from ray.data.block import BlockAccessor

from stfpm_ray.core.checkpoint import CheckpointMeta
from stfpm_ray.core.model import describe_precision, resolve_precision
from stfpm_ray.core.runtimes import check_request, choose_runtime
from stfpm_ray.core.score import DEFAULT_MAP_SIZE, ScoreSettings, ScoringModels, cpu_chunk, score_block
from stfpm_ray.data.plan import Plan, decode_block
from stfpm_ray.errors import UserError
from stfpm_ray.progress import Meter, Progress
from stfpm_ray.ray.resources import DECODE_CPUS, actor_pool_size, gpus_each
from stfpm_ray.ray.session import cluster_capacity, init_ray
from stfpm_ray.store.graph_cache import GraphCache
from stfpm_ray.store.scores import ROWS_PER_FILE, SCHEMA, DataFile, ScoresTable, write_data_files

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class ScoringOptions:
    """How a scoring run uses the cluster and stores maps (``stfpm-ray score`` and ``benchmark`` flags).

    ``actors`` is a fixed count or ``(min, max)``; None: 1 up to what the cluster holds next to decoding.
    ``gpus_per_actor`` None is ``auto``: one GPU per actor where the cluster has GPUs, resolved when the run
    starts (:func:`~stfpm_ray.ray.resources.gpus_each`).
    ``precision`` is ``auto`` (each category's calibration precision, bf16 only on GPUs that run it natively),
    ``fp32`` or ``bf16``. ``runtime`` runs the networks in ``torch``, in ``onnxruntime`` or ``openvino`` (each
    category's exported graph, fp32 on CPUs) or, with ``auto``, in whichever the driver measures fastest
    (:mod:`stfpm_ray.core.runtimes`).
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    actors: int | tuple[int, int] | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    map_size: int = DEFAULT_MAP_SIZE
    precision: str = "auto"
    runtime: str = "torch"

    def __post_init__(self) -> None:
        gpus = self.gpus_per_actor or 0.0
        if self.batch_size < 1 or self.map_size < 8 or gpus < 0 or self.cpus_per_actor <= 0:
            raise UserError("batch size must be >= 1, map size >= 8, GPUs per actor >= 0 and CPUs per actor > 0")
        resolve_precision(self.precision, "cpu")  # refuses an unknown precision before any work starts
        # what can be refused before the run starts; choose_runtime checks again once auto GPUs are resolved
        check_request(self.runtime, self.device, {"all categories": "bf16"} if self.precision == "bf16" else {})

    @property
    def device(self) -> str:
        """The actors' device, once ``auto`` GPUs are resolved."""
        return "cuda" if (self.gpus_per_actor or 0.0) > 0 else "cpu"

    @property
    def threads(self) -> int:
        return max(1, round(self.cpus_per_actor))


class Scorer:
    """A scoring actor: :func:`~stfpm_ray.core.score.score_block` on each batch, plus a progress record per
    process that the driver shows while the run goes and publishes in the manifest."""

    def __init__(
        self,
        checkpoints: dict[str, tuple[str, CheckpointMeta]],
        options: ScoringOptions,
        table: ScoresTable,
        run_id: str,
        runtime: str,
        graphs: dict[str, ray.ObjectRef],
    ) -> None:
        torch.set_num_threads(options.threads)
        if options.device == "cuda":
            torch.backends.cudnn.benchmark = True  # one input size per category: pick the fastest kernels once
        fetch = {category: functools.partial(ray.get, ref) for category, ref in graphs.items()}
        self.models = ScoringModels(checkpoints, options.device, fetch, options.threads, runtime)
        self.settings = ScoreSettings(
            map_size=options.map_size, precision=options.precision, chunk=cpu_chunk(options.device, options.threads)
        )
        precisions = {
            resolve_precision(options.precision, options.device, meta.operating_point.precision)
            for _, meta in checkpoints.values()
        }
        self.table, self.run_id = table, run_id
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": options.device,
            "precision": ",".join(sorted(precisions)),
            "runtime": runtime,
            "started_at": datetime.now(timezone.utc).isoformat(),
            "batches": 0,
            "rows": 0,
            "errors": 0,
        }
        self.table.record_worker(run_id, self.record)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = score_block(batch, self.models, self.settings, self.run_id)
        self.record["batches"] += 1
        self.record["rows"] += rows.num_rows
        self.record["errors"] += pc.sum(pc.equal(rows["status"], "error")).as_py() or 0
        self.record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        self.table.record_worker(self.run_id, self.record)
        return rows


class ScoresSink(Datasink):
    """Write tasks put the scored rows into the table folder (:func:`stfpm_ray.store.scores.write_data_files`);
    the driver keeps the list of files and publishes them itself (:mod:`stfpm_ray.store.publish`)."""

    def __init__(self, table: ScoresTable, run_id: str) -> None:
        self.table, self.run_id = table, run_id
        self.files: list[DataFile] = []

    @property
    def min_rows_per_write(self) -> int:
        return ROWS_PER_FILE

    def write(self, blocks: Iterable[Any], ctx: Any) -> list[DataFile]:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        rows = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        return write_data_files(rows, self.table.location, f"{self.run_id}-{ctx.task_idx:05d}")

    def on_write_complete(self, write_result: Any) -> None:
        self.files = [file for written in write_result.write_returns for file in written]


@contextmanager
def _watch(table: ScoresTable, run_id: str, total: int, progress: Progress, every_s: float = 2.0) -> Iterator[None]:
    """Show images done, rate, errors and ETA while the pipeline runs, from the actors' own records
    (the only progress signal that needs no Ray internals; a restarted actor's rows may count twice)."""
    meter = Meter(total, "images", progress)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            try:
                records = table.worker_records(run_id)
            except (OSError, ValueError):  # a record being replaced right now: read it next time
                continue
            meter.update(sum(r["rows"] for r in records), sum(r.get("errors", 0) for r in records))

    thread = threading.Thread(target=poll, name="stfpm-score-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        meter.close()


def decode_stage(planned: Plan, sources: list[tuple[pafs.FileSystem, str]]) -> ray.data.Dataset:
    """The dataset of decoded images, one read-and-decode task per planned block."""
    return ray.data.from_arrow(planned.blocks).map_batches(
        decode_block,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"sources": sources},
        num_cpus=DECODE_CPUS,
        udf_modifying_row_count=False,
    )


def score_plan(
    planned: Plan,
    sources: list[tuple[pafs.FileSystem, str]],
    checkpoints: dict[str, tuple[str, CheckpointMeta]],
    options: ScoringOptions,
    table: ScoresTable,
    run_id: str,
    progress: Progress,
) -> list[DataFile]:
    """Decode, score and write a plan on the Ray cluster; returns the files written (not yet published).

    ``checkpoints`` maps each category to its checkpoint folder and the metadata the run validated. Connects to Ray with
    :func:`~stfpm_ray.ray.session.init_ray` if it is not initialised yet.
    """
    init_ray()
    capacity = cluster_capacity()
    options = replace(options, gpus_per_actor=gpus_each(options.gpus_per_actor, capacity))
    pool = actor_pool_size(options.actors, options.gpus_per_actor, options.cpus_per_actor, capacity)
    each = f"{options.gpus_per_actor:g} GPUs" if options.device == "cuda" else f"{options.cpus_per_actor:g} CPUs"
    calibrated = (meta.operating_point.precision for _, meta in checkpoints.values())
    # the categories this run meets: a nightly run with new images of two categories exports two graphs
    meets = {name: checkpoints[name] for name in sorted(planned.categories & set(checkpoints))}
    precisions = {
        name: resolve_precision(options.precision, options.device, meta.operating_point.precision)
        for name, (_, meta) in meets.items()
    }
    runtime = choose_runtime(
        options.runtime, options.device, precisions, meets, options.threads, GraphCache(table.location)
    )
    progress(
        f"run {run_id}: {pool[0]}-{pool[1]} scoring actors on {options.device.upper()} ({each} each), "
        f"{describe_precision(options.precision, calibrated)}, runtime {runtime.runtime} ({runtime.reason}), "
        f"batch size {options.batch_size}, maps {options.map_size} px"
    )
    graphs = {name: ray.put(graph) for name, graph in runtime.graphs.items()}
    sink = ScoresSink(table, run_id)
    with _watch(table, run_id, planned.images, progress):
        decode_stage(planned, sources).map_batches(
            Scorer,
            batch_size=options.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]),
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor or None,
            fn_constructor_kwargs={
                "checkpoints": checkpoints,
                "options": options,
                "table": table,
                "run_id": run_id,
                "runtime": runtime.runtime,
                "graphs": graphs,
            },
            udf_modifying_row_count=False,
        ).write_datasink(sink)
    return sink.files
