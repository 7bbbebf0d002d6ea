"""Scoring image archives with Ray Data: ``stfpm-ray score --checkpoints CKPT_DIR --input PATH --out OUT_DIR``.

Pipeline, shaped by what costs what (decoding a large PNG takes tens of ms of one core, a GPU wants large
batches, the object store should carry as few bytes as possible):

1. **Check and list** on the driver, before Ray starts: every checkpoint is validated
   (:func:`stfpm_ray.core.checkpoint.discover_checkpoints`: metadata, weights header and shapes, weights
   hash against ``model_id``); a broken one turns its category's images into error rows naming the file
   while the other categories are scored. Inputs are listed by :mod:`stfpm_ray.data.listing` (local
   folders, ``s3://``, ``gs://``; directory symlinks not followed, one row per real file, undecodable
   names and dangling links as error rows) and routed to categories: ``--category`` for a plain archive
   folder, otherwise the MVTec layout (:func:`stfpm_ray.data.mvtec.sample_for`), ``test/`` only unless
   ``--split all``. An ``--incremental`` run drops files that already have an ``ok`` row for their model
   (a filtered scan of the table's key columns) before a single byte of them is read. Only paths enter
   the dataset, a block per ``batch_size`` files.
2. **Read and decode** in CPU tasks: each file is read through its filesystem and decoded to uint8 at the
   checkpoint's image size (:func:`stfpm_ray.data.images.decode_image`), so full-resolution pixels never enter
   the object store. A file that cannot be read or decoded (empty, truncated, not an image,
   decompression bomb, vanished) becomes an error row with a message; it never fails the job.
3. **Score** in an actor pool: each actor loads the teacher once and the student of each category it is
   sent, and runs the core's :func:`stfpm_ray.core.score.score_batch` on each batch (predict, shrink the map
   to ``map_size``, encode it, normalise, threshold), so float maps never enter the object store either.
4. **Write and commit**: write tasks put Parquet files into ``OUT_DIR``; the driver checks them (exactly
   one row per planned image) and publishes them as one Delta Lake commit that also removes the error
   rows this run retried and records the run's manifest (:mod:`stfpm_ray.store.scores`). The whole run
   holds the table's lease (:mod:`stfpm_ray.store.lease`): a second run into the same table refuses.

Defaults, and why:

* ``--map-size 128``: pixel metrics want maps of at least 64 px, and a 128x128 16-bit PNG keeps a row small
  (README: bytes per row).
* Actors take ``--cpus-per-actor 1`` (and as many torch threads), and the pool grows from 1 to as many
  actors as fit while ``DECODE_CPUS`` stays free (``cluster CPUs - 1`` by default; with
  ``--gpus-per-actor``, also at most the cluster's GPUs per actor): reading and decoding are Ray tasks
  that need CPU of their own, and a pool that holds every CPU starves them and the dataset hangs. On a
  2-core machine that is one single-threaded actor beside the decoding tasks; a pool that cannot leave
  room for decoding is refused with a message instead of hanging.
* Fault tolerance: Ray Data creates scoring actors with ``max_restarts=-1`` and ``max_task_retries=-1``, so
  a scoring process that dies is restarted and its unfinished batches rerun (the manifest's ``workers``
  then lists both processes); Parquet files are named by run and write task, so a retried write replaces
  rather than duplicates, and the pre-commit check refuses to publish anything but one row per image.

Reading the output (``OUT_DIR`` is the ``--out`` table; these lines decode one anomaly map)::

    import io, numpy as np
    from deltalake import DeltaTable
    from PIL import Image
    row = DeltaTable(OUT_DIR).to_pandas().query("status == 'ok'").iloc[0]
    png = np.asarray(Image.open(io.BytesIO(row.anomaly_map)), dtype=np.float32)
    anomaly_map = png / 65535 * row.map_scale  # map_size x map_size float32, max = map_scale

``score`` is the raw image score (maximum of the full-resolution map), ``score_norm = score / threshold``
and ``is_anomalous = score > threshold``, with the threshold the checkpoint derived from held-out good
images. The table holds one row per (path, model_id): several models appear for one path when the
checkpoints change between runs, and an error row is replaced when a later run scores its image.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import torch
from ray.data import Datasink
from ray.data.block import BlockAccessor

from stfpm_ray.core.checkpoint import CheckpointMeta, discover_checkpoints
from stfpm_ray.core.model import resolve_precision
from stfpm_ray.core.score import (
    DEFAULT_MAP_SIZE,
    ScoreSettings,
    cpu_chunk,
    load_scoring_model,
    pixels_to_batch,
    score_batch,
)
from stfpm_ray.data.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from stfpm_ray.data.listing import Listing, list_images
from stfpm_ray.data.mvtec import category_for, is_training_image, sample_for
from stfpm_ray.errors import InputNotFoundError, UserError
from stfpm_ray.progress import Meter, Progress, fixed_width_table, log_progress
from stfpm_ray.ray.session import cluster_capacity, init_ray
from stfpm_ray.store.lease import Lease
from stfpm_ray.store.scores import (
    RESULT_FIELDS,
    SAMPLE_FIELDS,
    SCHEMA,
    DataFile,
    ScoresTable,
    counts_by_category,
    duplicated_paths,
    write_data_files,
)

DEFAULT_BATCH_SIZE = 32
# Files larger than this are refused unread: 100 MP (the decoder's pixel limit) of uncompressed RGB is
# 300 MB, so a bigger file is not an inspection image, and reading it whole could exhaust a worker.
MAX_FILE_BYTES = 512 * 1024 * 1024
# Rows per Parquet file: keeps files in the range of a few MB to tens of MB.
ROWS_PER_FILE = 2048
# What one read-and-decode task reserves; the actor pool is sized to leave at least this free. Decoding
# costs less than the forward pass it feeds on CPU (README: where the CPU time goes), so half a CPU per
# task keeps decoding ahead of a pool that holds the rest. A request that differs from the actors' also keeps
# Ray Data from fusing decoding into the actors (it fuses consecutive map stages whose resource requests are
# equal), which would serialise the two.
DECODE_CPUS = 0.5

# The rows of the plan: a sample's fields, where to read it, and what the decode stage needs.
_PLAN_SCHEMA = pa.schema(
    SAMPLE_FIELDS
    + [
        pa.field("source", pa.int32()),
        pa.field("size", pa.int64()),
        pa.field("image_size", pa.int32()),
        pa.field("error", pa.string()),
    ]
)
_DECODED_SCHEMA = pa.schema(
    [field for field in _PLAN_SCHEMA if field.name not in ("source", "size")] + [("pixels", pa.binary())]
)


@dataclass
class CategoryCounts:
    """One category in one run: rows scored, rows written as errors, images skipped as already scored."""

    ok: int = 0
    error: int = 0
    skipped: int = 0


@dataclass
class ScoreSummary:
    """What a run did; ``version`` is None when nothing was written."""

    run_id: str
    out_dir: str
    counts: dict[str, CategoryCounts] = field(default_factory=dict)
    rows_written: int = 0
    files_written: int = 0
    seconds: float = 0.0
    version: int | None = None  # the table version this run committed

    @property
    def error_rows(self) -> int:
        return sum(counts.error for counts in self.counts.values())

    def table(self) -> str:
        """The per-category ok/error/skipped counts as aligned text."""
        rows = [(name, c.ok, c.error, c.skipped) for name, c in sorted(self.counts.items())]
        total = ("total", *(sum(row[i] for row in rows) for i in (1, 2, 3)))
        return fixed_width_table(("category", "ok", "error", "skipped"), [*rows, total])


@dataclass(frozen=True)
class ScoringOptions:
    """How a scoring run uses the cluster and stores maps (``stfpm-ray score`` and ``benchmark`` flags).

    ``actors`` is a fixed count or ``(min, max)``; None: 1 up to what the cluster holds next to decoding.
    ``precision`` is ``auto`` (bf16 on GPUs, fp32 on CPUs), ``fp32`` or ``bf16``.
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    actors: int | tuple[int, int] | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    map_size: int = DEFAULT_MAP_SIZE
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.map_size < 8 or self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise UserError("batch size must be >= 1, map size >= 8, GPUs per actor >= 0 and CPUs per actor > 0")
        resolve_precision(self.precision, "cpu")  # refuses an unknown precision before any work starts

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    @property
    def threads(self) -> int:
        return max(1, round(self.cpus_per_actor))


# ---------------------------------------------------------------------------------------------- inputs

SPLITS = ("test", "all")


def _row_error(listed: str | None, sample: Any, size: int, checkpoints: dict, problems: dict[str, str]) -> str | None:
    """Why a planned file will not be scored, or None: listing problem, broken or missing checkpoint, size."""
    if listed is not None:
        return listed
    if sample.category in problems:
        return f"checkpoint of category {sample.category!r} is unusable: {problems[sample.category]}"
    if sample.category not in checkpoints:
        return f"no checkpoint for category {sample.category!r} (have: {', '.join(sorted(checkpoints))})"
    if size > MAX_FILE_BYTES:
        return f"file of {size} bytes exceeds the limit of {MAX_FILE_BYTES} bytes"
    return None


def plan(
    listing: Listing,
    checkpoints: dict[str, tuple[str, CheckpointMeta]],
    problems: dict[str, str],
    category: str | None,
    scored: Callable[[pa.Table], pa.Array] | None,
    block_rows: int,
    split: str = "test",
) -> tuple[list[pa.Table], dict[str, CategoryCounts]]:
    """Route files to categories, drop those that already have an ok row for their model, cut the rest in blocks.

    A category without a usable checkpoint gets error rows instead of failing the run. ``scored`` answers,
    for a table of ``(path, model_id)``, which already have an ok row (incremental runs). Blocks are Arrow
    tables of ``block_rows`` files, one read-and-decode task each.
    """
    files = listing.files
    if category is None and split == "test":  # an MVTec root: train/good is what the model learnt from
        files = files.filter(pc.invert(pa.array([is_training_image(p) for p in files["path"].to_pylist()], pa.bool_())))
    paths = files["path"].to_pylist()
    categories = [category_for(path, category) for path in paths]
    models = [checkpoints[name][1].model_id if name in checkpoints else None for name in categories]
    keys = pa.table({"path": files["path"], "model_id": pa.array(models, pa.string())})
    skip = (scored(keys) if scored else pa.array([False] * len(paths))).to_pylist()
    sources, sizes, errors = (files[name].to_pylist() for name in ("source", "size", "error"))
    counts: dict[str, CategoryCounts] = {}
    rows = []
    for i, model_id in enumerate(models):
        tally = counts.setdefault(categories[i], CategoryCounts())
        if skip[i]:
            tally.skipped += 1
            continue
        sample = sample_for(paths[i], category)  # label, defect and mask: only for what will be scored
        rows.append(
            {
                "path": paths[i],
                "source": sources[i],
                "size": sizes[i],
                "category": sample.category,
                "label": sample.label,
                "defect": sample.defect,
                "mask_path": sample.mask_path,
                "model_id": model_id,
                "image_size": checkpoints[sample.category][1].image_size if model_id else 0,
                "error": _row_error(errors[i], sample, sizes[i], checkpoints, problems),
            }
        )
    table = pa.Table.from_pylist(rows, _PLAN_SCHEMA)
    return [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)], counts


# ---------------------------------------------------------------------------------------- Ray stages


def decode_batch(batch: pa.Table, sources: list[tuple[pafs.FileSystem, str]]) -> pa.Table:
    """Read and decode a block of planned files to uint8 pixels at their checkpoint's size."""
    pixels: list[bytes | None] = []
    errors = batch.column("error").to_pylist()
    for i, (path, source, size) in enumerate(
        zip(batch["path"].to_pylist(), batch["source"].to_pylist(), batch["image_size"].to_pylist())
    ):
        if errors[i] is not None:
            pixels.append(None)
            continue
        filesystem, prefix = sources[source]
        try:
            with filesystem.open_input_file(path[len(prefix) :]) as handle:
                data = handle.read()
            pixels.append(decode_image(data, size).tobytes())
        except ImageDecodeError as exc:
            pixels.append(None)
            errors[i] = str(exc)
        except OSError as exc:  # pyarrow's I/O errors: missing, vanished, unreadable files
            pixels.append(None)
            errors[i] = f"cannot read file: {exc}"
        except Exception as exc:  # a decoder bug on one odd file must not fail the night's job
            pixels.append(None)
            errors[i] = f"unexpected error while decoding: {type(exc).__name__}: {exc}"
    columns = {name: batch.column(name) for name in _DECODED_SCHEMA.names if name not in ("error", "pixels")}
    return pa.table({**columns, "error": errors, "pixels": pixels}, schema=_DECODED_SCHEMA)


class Scorer:
    """A scoring actor: :func:`stfpm_ray.core.score.score_batch` per category, plus Ray plumbing (one teacher
    per backbone, students loaded on first use, a progress record per process for the manifest)."""

    def __init__(self, checkpoints: dict[str, str], options: ScoringOptions, table: ScoresTable, run_id: str) -> None:
        torch.set_num_threads(options.threads)
        if options.device == "cuda":
            torch.backends.cudnn.benchmark = True  # one input size per category: pick the fastest kernels once
        self.device = options.device
        self.settings = ScoreSettings(
            map_size=options.map_size,
            precision=resolve_precision(options.precision, options.device),
            chunk=cpu_chunk(options.device, options.threads),
        )
        self.folders = checkpoints
        self.models: dict[str, tuple[Any, CheckpointMeta]] = {}
        self.teachers: dict[tuple, Any] = {}
        self.table, self.run_id = table, run_id
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.device,
            "precision": self.settings.precision,
            "started_at": datetime.now(timezone.utc).isoformat(),
            "batches": 0,
            "rows": 0,
            "errors": 0,
        }
        self.table.record_worker(run_id, self.record)

    def _model(self, category: str) -> tuple[Any, CheckpointMeta]:
        if category not in self.models:
            self.models[category] = load_scoring_model(self.folders[category], self.device, self.teachers)
        return self.models[category]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        groups: dict[tuple[str, int], list[int]] = {}
        for i, row in enumerate(rows):
            if row["error"] is None:
                groups.setdefault((row["category"], row["image_size"]), []).append(i)
        scored: dict[int, dict[str, Any]] = {}
        for (category, size), index in groups.items():
            model, meta = self._model(category)
            images = pixels_to_batch([rows[i]["pixels"] for i in index], size, self.device)
            scored.update(zip(index, map(asdict, score_batch(model, meta, images, self.settings))))
        now = datetime.now(timezone.utc)
        missing = dict.fromkeys(field.name for field in RESULT_FIELDS)
        out = [
            {
                **row,
                **scored.get(i, missing),
                "run_id": self.run_id,
                "scored_at": now,
                "status": "ok" if i in scored else "error",
            }
            for i, row in enumerate(rows)
        ]
        self.record["batches"] += 1
        self.record["rows"] += len(rows)
        self.record["errors"] += len(rows) - len(scored)
        self.record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        self.table.record_worker(self.run_id, self.record)
        return pa.Table.from_pylist(out, schema=SCHEMA)


class ScoresSink(Datasink):
    """Write tasks put the scored rows into the table folder (:func:`stfpm_ray.store.scores.write_data_files`);
    the driver keeps the list of files for the commit, which it makes itself (see
    :mod:`stfpm_ray.store.scores` for why not ``write_delta``)."""

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


# ------------------------------------------------------------------------------------------- driver


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
    actors: int | tuple[int, int] | None, gpus_per_actor: float, cpus_per_actor: float, resources: dict[str, float]
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


def _run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def decode_stage(blocks: list[pa.Table], sources: list[tuple[pafs.FileSystem, str]]) -> ray.data.Dataset:
    """The dataset of decoded images, one read-and-decode task per planned block."""
    return ray.data.from_arrow(blocks).map_batches(
        decode_batch,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"sources": sources},
        num_cpus=DECODE_CPUS,
        udf_modifying_row_count=False,
    )


def _run_pipeline(run: _Run, options: ScoringOptions, pool: tuple[int, int]) -> list[DataFile]:
    """Decode, score and write; returns the files the write tasks made (not committed yet)."""
    sink = ScoresSink(run.table, run.run_id)
    decode_stage(run.planned, run.listing.sources).map_batches(
        Scorer,
        batch_size=options.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor or None,
        fn_constructor_kwargs={
            "checkpoints": {name: folder for name, (folder, _) in run.checkpoints.items()},
            "options": options,
            "table": run.table,
            "run_id": run.run_id,
        },
        udf_modifying_row_count=False,
    ).write_datasink(sink)
    return sink.files


@dataclass
class _Run:
    """One scoring run on the driver: what was found and planned, and where it goes."""

    run_id: str
    started: float
    inputs: list[str]
    checkpoints: dict[str, tuple[str, CheckpointMeta]]
    table: ScoresTable
    mode: str
    listing: Listing
    planned: list[pa.Table]
    summary: ScoreSummary


def _checkpoints(checkpoints: str | Path, category: str | None, progress: Progress) -> tuple[dict, dict[str, str]]:
    """Valid checkpoints and, per broken category, the one line that says why (printed here, once)."""
    found, problems = discover_checkpoints(checkpoints)
    for name, problem in sorted(problems.items()):
        progress(f"checkpoint of {name} is unusable, its images become error rows: {problem}")
    if category is not None and category not in found:
        have = ", ".join(sorted(found)) or "none usable"
        raise UserError(f"no usable checkpoint for category {category!r} under {checkpoints} (have: {have})")
    return found, problems


def _prepare(
    checkpoints: str | Path,
    inputs: list[str],
    table: ScoresTable,
    category: str | None,
    options: ScoringOptions,
    mode: str,
    split: str,
    run_id: str,
    progress: Progress,
) -> _Run:
    """Everything before Ray, under the lease: checkpoints, table checks, listing and planning."""
    started = time.time()
    found, problems = _checkpoints(checkpoints, category, progress)
    table.clear_runs()
    exists = table.check_mode(mode == "incremental", mode == "overwrite")
    listing = list_images(inputs)
    if listing.files.num_rows == 0:
        raise InputNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {', '.join(inputs)}")
    for reason, count in sorted(listing.skipped.items()):
        progress(f"listing: skipped {count} {reason}")
    scored = table.already_scored if mode == "incremental" and exists else None
    planned, counts = plan(listing, found, problems, category, scored, options.batch_size, split)
    if not counts:
        raise InputNotFoundError(f"only training images under {', '.join(inputs)}; pass --split all to score them")
    if all(name not in found and name not in problems for name in counts):
        raise UserError(
            f"none of the {listing.files.num_rows} images belongs to a category with a checkpoint "
            f"({', '.join(sorted(found))}); for a plain folder of images pass --category"
        )
    summary = ScoreSummary(run_id=run_id, out_dir=table.uri, counts=counts)
    return _Run(run_id, started, inputs, found, table, mode, listing, planned, summary)


def _manifest(run: _Run, rows: int, files: list[DataFile], options: ScoringOptions, checkpoints: str | Path) -> dict:
    return {
        "run_id": run.run_id,
        "started_at": datetime.fromtimestamp(run.started, timezone.utc).isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "seconds": round(time.time() - run.started, 3),
        "mode": run.mode,
        "inputs": run.inputs,
        "checkpoints": str(checkpoints),
        "model_ids": {name: meta.model_id for name, (_, meta) in sorted(run.checkpoints.items())},
        "map_size": options.map_size,
        "batch_size": options.batch_size,
        "precision": options.precision,
        "rows": rows,
        "files": [{"name": f.name, "rows": f.rows} for f in files],
        "counts": {name: vars(c) for name, c in sorted(run.summary.counts.items())},
        "listing_skipped": run.listing.skipped,
        "workers": run.table.worker_records(run.run_id),
    }


@contextmanager
def _watch(run: _Run, progress: Progress, every_s: float = 2.0) -> Iterator[None]:
    """Show images done, rate, errors and ETA while the pipeline runs, from the actors' own records
    (the only progress signal that needs no Ray internals; a restarted actor's rows may count twice)."""
    meter = Meter(sum(block.num_rows for block in run.planned), "images", progress)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            try:
                records = run.table.worker_records(run.run_id)
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


def _score_and_commit(
    run: _Run, lease: Lease, options: ScoringOptions, checkpoints: str | Path, progress: Progress
) -> None:
    """Ray stages, the pre-commit check, then one commit; a failure before the commit changes nothing."""
    summary, counts = run.summary, run.summary.counts
    init_ray()
    pool = actor_pool_size(options.actors, options.gpus_per_actor, options.cpus_per_actor, cluster_capacity())
    progress(
        f"run {run.run_id}: {pool[0]}-{pool[1]} scoring actors, batch size {options.batch_size}, "
        f"maps {options.map_size} px"
    )
    try:
        try:
            with _watch(run, progress):
                files = _run_pipeline(run, options, pool)
            index = run.table.read_index(files)
            _check_staged(index, run.planned)
            for name, tally in counts_by_category(index).items():
                counts[name].ok, counts[name].error = tally["ok"], tally["error"]
            removed, kept = (
                run.table.retried_errors(index["path"], run.run_id) if run.mode == "incremental" else ([], [])
            )
            manifest = {**_manifest(run, index.num_rows, files, options, checkpoints), "replaced_error_files": removed}
            lease.check()
        except BaseException:
            run.table.discard(run.run_id)
            raise
        # Not under discard: once the log entry may exist, these files may be live and must never be deleted.
        summary.version = run.table.commit(files + kept, removed, manifest, overwrite=run.mode == "overwrite")
    finally:
        run.table.clear_runs()
    summary.seconds = time.time() - run.started
    summary.rows_written, summary.files_written = index.num_rows, len(files)
    progress(
        f"wrote {summary.rows_written} rows in {summary.files_written} files to {run.table.uri} "
        f"(table version {summary.version}, {summary.seconds:.1f} s)"
    )


def score_images(
    checkpoints: str | Path,
    inputs: str | Sequence[str],
    out_dir: str | Path,
    options: ScoringOptions = ScoringOptions(),
    category: str | None = None,
    incremental: bool = False,
    overwrite: bool = False,
    split: str = "test",
    progress: Progress = log_progress,
) -> ScoreSummary:
    """Score every image under ``inputs`` into the scores table ``out_dir``; see the module docstring.

    Connects to Ray with :func:`stfpm_ray.ray.session.init_ray` if it is not initialised yet.
    """
    if split not in SPLITS:
        raise UserError(f"--split takes {' or '.join(SPLITS)}, got {split!r}")
    if incremental and overwrite:
        raise UserError("--incremental and --overwrite exclude each other")
    inputs = [inputs] if isinstance(inputs, str) else [str(i) for i in inputs]
    mode = "incremental" if incremental else "overwrite" if overwrite else "plain"
    table, run_id = ScoresTable(str(out_dir)), _run_id()
    with Lease(table.location, run_id) as lease:
        if lease.took_over is not None:
            progress(f"took over the lease of {lease.took_over.describe()}: that run is gone")
        run = _prepare(checkpoints, inputs, table, category, options, mode, split, run_id, progress)
        skipped = sum(c.skipped for c in run.summary.counts.values())
        if not run.planned:
            run.summary.seconds = time.time() - run.started
            progress(
                f"nothing new to score: all {skipped} images already have ok rows for their models; nothing written"
            )
            return run.summary
        progress(
            f"{run.listing.files.num_rows} images: {sum(b.num_rows for b in run.planned)} to score, "
            f"{skipped} already scored (skipped)"
        )
        _score_and_commit(run, lease, options, checkpoints, progress)
    return run.summary


def _check_staged(index: pa.Table, planned: list[pa.Table]) -> None:
    """Refuse to commit unless every planned image has exactly one row."""
    expected = pa.chunked_array([chunk for block in planned for chunk in block["path"].chunks], pa.string())
    duplicates = duplicated_paths(index)
    missing = expected.filter(pc.invert(pc.is_in(expected, value_set=index["path"].combine_chunks())))
    if duplicates or len(missing) or index.num_rows != len(expected):
        raise RuntimeError(
            f"the run wrote {index.num_rows} rows for {len(expected)} images "
            f"({len(duplicates)} paths twice, {len(missing)} missing, "
            f"e.g. {(duplicates or missing.to_pylist())[:2]}); nothing was committed"
        )
