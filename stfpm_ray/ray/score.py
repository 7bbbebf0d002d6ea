"""Scoring image archives with Ray Data: ``stfpm-ray score --checkpoints CKPT_DIR --input PATH --out OUT_DIR``.

Pipeline, shaped by what costs what (decoding a large PNG takes tens of ms of one core, a GPU wants large
batches, the object store should carry as few bytes as possible):

1. **List** the inputs on the driver through pyarrow filesystems (local folders, ``s3://``, ``gs://``;
   png/jpg/jpeg/bmp/tif/tiff in any letter case; hidden ``.`` entries skipped) and route every file to a
   category: ``--category`` for a plain archive folder, otherwise the MVTec layout
   (:func:`stfpm_ray.data.mvtec.sample_for`: category, label and defect from the path, mask from
   ``ground_truth``). Listing on the driver, rather than inside ``read_binary_files``, lets a nightly
   ``--incremental`` run drop already-scored files before a single byte of them is read. Only paths
   enter the dataset, a block per ``batch_size`` files.
2. **Read and decode** in CPU tasks: each file is read through its filesystem and decoded to uint8 at the
   checkpoint's image size (:func:`stfpm_ray.data.images.decode_image`), so full-resolution pixels never enter
   the object store. A file that cannot be read or decoded (empty, truncated, not an image,
   decompression bomb, vanished) becomes an error row with a message; it never fails the job.
3. **Score** in an actor pool: each actor loads the teacher once and the student of each category it is
   sent, and runs the core's :func:`stfpm_ray.core.score.score_batch` on each batch (predict, shrink the map
   to ``map_size``, encode it, normalise, threshold), so float maps never enter the object store either.
4. **Write** Parquet into a staging folder, check it (exactly one row per image), then commit it into
   ``OUT_DIR`` atomically with a manifest (:mod:`stfpm_ray.store.scores`).

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
  then lists both processes); Parquet files are named by write task, so a retried write replaces rather
  than duplicates, and the pre-commit check refuses to publish anything but one row per image.

Reading the output (``OUT_DIR`` is the ``--out`` folder; these five lines decode one anomaly map)::

    import io, numpy as np, pandas as pd
    from PIL import Image
    row = pd.read_parquet(OUT_DIR).query("status == 'ok'").iloc[0]
    png = np.asarray(Image.open(io.BytesIO(row.anomaly_map)), dtype=np.float32)
    anomaly_map = png / 65535 * row.map_scale  # map_size x map_size float32, max = map_scale

``score`` is the raw image score (maximum of the full-resolution map), ``score_norm = score / threshold``
and ``is_anomalous = score > threshold``, with the threshold the checkpoint derived from held-out good
images. Several ``model_id`` values can appear for one path when the checkpoints change between runs.
"""

from __future__ import annotations

import os
import resource
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import torch

from stfpm_ray.core.checkpoint import META_FILE, CheckpointMeta, read_meta
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
from stfpm_ray.data.mvtec import sample_for
from stfpm_ray.errors import InputNotFoundError, UserError
from stfpm_ray.progress import Progress, fixed_width_table, log_progress
from stfpm_ray.ray.session import cluster_capacity, init_ray
from stfpm_ray.store.fs import resolve
from stfpm_ray.store.scores import (
    RESULT_FIELDS,
    SAMPLE_FIELDS,
    SCHEMA,
    OutputFolder,
    counts_by_category,
    duplicated_paths,
)

DEFAULT_BATCH_SIZE = 32
# Files larger than this are refused unread: 100 MP (the decoder's pixel limit) of uncompressed RGB is
# 300 MB, so a bigger file is not an inspection image, and reading it whole could exhaust a worker.
MAX_FILE_BYTES = 512 * 1024 * 1024
# Rows per Parquet file: keeps files in the range of a few MB to tens of MB.
ROWS_PER_FILE = 2048
# What one read-and-decode task reserves; the actor pool is sized to leave at least this free. Decoding
# costs less than the forward pass it feeds on CPU (README: where the CPU time goes), so half a CPU per
# task keeps decoding ahead of a pool that holds the rest. A request that differs from the actors' also keeps Ray Data from fusing
# decoding into the actors (it fuses consecutive map stages whose resource requests are equal), which
# would serialise the two.
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
    """What a run did; ``manifest`` is None when nothing was written."""

    run_id: str
    out_dir: str
    counts: dict[str, CategoryCounts] = field(default_factory=dict)
    rows_written: int = 0
    files_written: int = 0
    seconds: float = 0.0
    manifest: str | None = None

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


def find_checkpoints(checkpoints: str | Path) -> dict[str, tuple[str, CheckpointMeta]]:
    """``{category: (folder, meta)}`` from ``CKPT_DIR/<category>/`` (or one checkpoint folder itself)."""
    root = Path(checkpoints)
    if not root.is_dir():
        raise InputNotFoundError(f"checkpoint folder {root} does not exist (train one with `stfpm-ray train`)")
    single = (root / META_FILE).is_file()
    folders = [root] if single else sorted(p for p in root.iterdir() if (p / META_FILE).is_file())
    if not folders:
        raise InputNotFoundError(f"no checkpoints under {root}: expected {root}/<category>/{META_FILE}")
    found: dict[str, tuple[str, CheckpointMeta]] = {}
    for folder in folders:
        meta = read_meta(folder)
        if meta.category in found:
            raise UserError(
                f"two checkpoints for category {meta.category!r}: {found[meta.category][0]} and {folder}"
            )
        found[meta.category] = (str(folder.resolve()), meta)
    return found


def is_mvtec_mask(path: str) -> bool:
    """Ground-truth masks of an MVTec-layout root (``<category>/ground_truth/<defect>/*``) are not inputs."""
    parts = path.split("/")
    return len(parts) >= 3 and parts[-3] == "ground_truth"


def list_images(inputs: Sequence[str]) -> tuple[list[tuple[str, int, int]], list[tuple[pafs.FileSystem, str]]]:
    """Image files under the inputs as ``(path, source, size)`` sorted and unique, plus the sources.

    A source is ``(filesystem, prefix)``; ``prefix + path inside the filesystem`` is the recorded path.
    An input that names a file directly is taken whatever its extension; in folders, hidden entries and
    MVTec ground-truth masks are skipped.
    """
    sources: list[tuple[pafs.FileSystem, str]] = []
    files: dict[str, tuple[int, int]] = {}
    for uri in inputs:
        location = resolve(uri)
        filesystem, base, prefix = location.filesystem, location.path, location.prefix
        sources.append((filesystem, prefix))
        info = filesystem.get_file_info(base)
        if info.type == pafs.FileType.File:
            entries = [info]
        elif info.type == pafs.FileType.Directory:
            entries = [
                e
                for e in filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
                if e.type == pafs.FileType.File
                and e.extension.lower() in {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}
                and not any(part.startswith(".") for part in e.path[len(base):].split("/"))
                and not is_mvtec_mask(e.path)
            ]
        else:
            raise InputNotFoundError(f"input {uri} does not exist")
        for entry in entries:
            files.setdefault(prefix + entry.path, (len(sources) - 1, entry.size or 0))
    return [(path, *files[path]) for path in sorted(files)], sources


def plan(
    files: Sequence[tuple[str, int, int]],
    checkpoints: dict[str, tuple[str, CheckpointMeta]],
    category: str | None,
    scored: dict[str, set[str | None]],
    block_rows: int,
) -> tuple[list[pa.Table], dict[str, CategoryCounts]]:
    """Route files to categories, drop those that already have a row for their model, cut the rest in blocks.

    A category without a checkpoint gets error rows (model_id null) instead of failing the run. Blocks are
    Arrow tables of ``block_rows`` files (a read-and-decode task each), built as the rows come so that the
    driver holds a few hundred bytes per file, not a Python dict.
    """
    blocks: list[pa.Table] = []
    rows: list[dict[str, Any]] = []
    counts: dict[str, CategoryCounts] = {}
    for path, source, size in files:
        sample = sample_for(path, category)
        known = checkpoints.get(sample.category)
        meta = known[1] if known else None
        model_id = meta.model_id if meta else None
        tally = counts.setdefault(sample.category, CategoryCounts())
        if model_id in scored.get(path, ()):
            tally.skipped += 1
            continue
        error = None
        if meta is None:
            error = f"no checkpoint for category {sample.category!r} (have: {', '.join(sorted(checkpoints))})"
        elif size > MAX_FILE_BYTES:
            error = f"file of {size} bytes exceeds the limit of {MAX_FILE_BYTES} bytes"
        rows.append({
            "path": path, "source": source, "size": size, "category": sample.category, "label": sample.label,
            "defect": sample.defect, "mask_path": sample.mask_path, "model_id": model_id,
            "image_size": meta.image_size if meta else 0, "error": error,
        })
        if len(rows) == block_rows:
            blocks.append(pa.Table.from_pylist(rows, _PLAN_SCHEMA))
            rows = []
    if rows:
        blocks.append(pa.Table.from_pylist(rows, _PLAN_SCHEMA))
    return blocks, counts


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
            with filesystem.open_input_file(path[len(prefix):]) as handle:
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

    def __init__(
        self, checkpoints: dict[str, str], options: ScoringOptions, output: OutputFolder, staging: str
    ) -> None:
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
        self.output, self.staging = output, staging
        self.record = {
            "host": socket.gethostname(), "pid": os.getpid(), "device": self.device,
            "precision": self.settings.precision, "started_at": datetime.now(timezone.utc).isoformat(),
            "batches": 0, "rows": 0,
        }
        self.output.record_worker(staging, self.record)

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
            {**row, **scored.get(i, missing), "scored_at": now, "status": "ok" if i in scored else "error"}
            for i, row in enumerate(rows)
        ]
        self.record["batches"] += 1
        self.record["rows"] += len(rows)
        self.record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        self.output.record_worker(self.staging, self.record)
        return pa.Table.from_pylist(out, schema=SCHEMA)


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


def _run_pipeline(
    planned: list[pa.Table],
    sources: list[tuple[pafs.FileSystem, str]],
    checkpoints: dict[str, tuple[str, CheckpointMeta]],
    output: OutputFolder,
    staging: str,
    options: ScoringOptions,
    pool: tuple[int, int],
) -> None:
    dataset = decode_stage(planned, sources).map_batches(
        Scorer,
        batch_size=options.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor or None,
        fn_constructor_kwargs={
            "checkpoints": {name: folder for name, (folder, _) in checkpoints.items()},
            "options": options,
            "output": output,
            "staging": staging,
        },
        udf_modifying_row_count=False,
    )
    dataset.write_parquet(staging, filesystem=output.fs, min_rows_per_file=ROWS_PER_FILE)


@dataclass
class _Run:
    """One scoring run on the driver: what was found and planned, and where it goes."""

    run_id: str
    started: float
    inputs: list[str]
    checkpoints: dict[str, tuple[str, CheckpointMeta]]
    output: OutputFolder
    existing: list[str]
    planned: list[pa.Table]
    sources: list[tuple[pafs.FileSystem, str]]
    summary: ScoreSummary
    n_files: int


def _prepare(
    checkpoints: str | Path, inputs: list[str], out_dir: str | Path, category: str | None,
    options: ScoringOptions, incremental: bool, overwrite: bool, progress: Progress,
) -> _Run:
    """Everything before Ray: checkpoints, output folder checks, listing and planning."""
    started = time.time()
    found = find_checkpoints(checkpoints)
    if category is not None and category not in found:
        raise UserError(
            f"no checkpoint for category {category!r} under {checkpoints} (have: {', '.join(sorted(found))})"
        )
    output = OutputFolder(str(out_dir))
    output.recover(progress)
    existing = output.check_mode(incremental, overwrite)
    files, sources = list_images(inputs)
    if not files:
        raise InputNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {', '.join(inputs)}")
    scored = output.scored_keys() if incremental else {}
    planned, counts = plan(files, found, category, scored, options.batch_size)
    if all(name not in found for name in counts):
        raise UserError(
            f"none of the {len(files)} images belongs to a category with a checkpoint ({', '.join(sorted(found))}); "
            "for a plain folder of images pass --category"
        )
    run_id = _run_id()
    summary = ScoreSummary(run_id=run_id, out_dir=str(out_dir), counts=counts)
    return _Run(run_id, started, inputs, found, output, existing, planned, sources, summary, len(files))


def _manifest(run: _Run, staged_rows: int, options: ScoringOptions, mode: str, checkpoints: str | Path) -> dict:
    counts = run.summary.counts
    return {
        "run_id": run.run_id,
        "started_at": datetime.fromtimestamp(run.started, timezone.utc).isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "seconds": round(run.summary.seconds, 3),
        "mode": mode,
        "inputs": run.inputs,
        "checkpoints": str(checkpoints),
        "model_ids": {name: meta.model_id for name, (_, meta) in sorted(run.checkpoints.items())},
        "map_size": options.map_size,
        "batch_size": options.batch_size,
        "precision": options.precision,
        "rows": staged_rows,
        "counts": {name: vars(c) for name, c in sorted(counts.items())},
    }


def score_images(
    checkpoints: str | Path,
    inputs: str | Sequence[str],
    out_dir: str | Path,
    options: ScoringOptions = ScoringOptions(),
    category: str | None = None,
    incremental: bool = False,
    overwrite: bool = False,
    progress: Progress = log_progress,
) -> ScoreSummary:
    """Score every image under ``inputs`` into the Parquet dataset ``out_dir``; see the module docstring.

    Connects to Ray with :func:`stfpm_ray.ray.session.init_ray` if it is not initialised yet.
    """
    inputs = [inputs] if isinstance(inputs, str) else [str(i) for i in inputs]
    run = _prepare(checkpoints, inputs, out_dir, category, options, incremental, overwrite, progress)
    summary, counts = run.summary, run.summary.counts
    skipped = sum(c.skipped for c in counts.values())
    if not run.planned:
        summary.seconds = time.time() - run.started
        progress(f"nothing new to score: all {skipped} images already have rows for their models; nothing written")
        return summary
    progress(f"{run.n_files} images: {sum(b.num_rows for b in run.planned)} to score, "
             f"{skipped} already scored (skipped)")
    init_ray()
    pool = actor_pool_size(options.actors, options.gpus_per_actor, options.cpus_per_actor, cluster_capacity())
    progress(f"run {run.run_id}: {pool[0]}-{pool[1]} scoring actors, batch size {options.batch_size}, "
             f"maps {options.map_size} px")
    staging = run.output.start_staging(run.run_id)
    mode = "incremental" if incremental else "overwrite" if overwrite else "plain"
    try:
        _run_pipeline(run.planned, run.sources, run.checkpoints, run.output, staging, options, pool)
        staged = run.output.read_staging(staging)
        _check_staged(staged.index, run.planned)
        for name, tally in counts_by_category(staged.index).items():
            counts[name].ok, counts[name].error = tally["ok"], tally["error"]
        summary.seconds = time.time() - run.started
        manifest = _manifest(run, staged.index.num_rows, options, mode, checkpoints)
        manifest["workers"] = run.output.worker_records(staging)
    except BaseException:
        run.output.discard(staging)
        raise
    # From here a failure leaves the commit intent in staging, and the next run finishes the commit.
    summary.manifest = run.output.commit(run.run_id, staged, manifest, run.existing if overwrite else [])
    summary.rows_written, summary.files_written = staged.index.num_rows, len(staged.files)
    progress(
        f"wrote {summary.rows_written} rows in {summary.files_written} files to {out_dir} ({summary.seconds:.1f} s)"
    )
    return summary


def _check_staged(index: pa.Table, planned: list[pa.Table]) -> None:
    """Refuse to commit unless every planned image has exactly one staged row."""
    expected = pa.chunked_array([chunk for block in planned for chunk in block["path"].chunks], pa.string())
    duplicates = duplicated_paths(index)
    missing = expected.filter(pc.invert(pc.is_in(expected, value_set=index["path"].combine_chunks())))
    if duplicates or len(missing) or index.num_rows != len(expected):
        raise RuntimeError(
            f"staged output has {index.num_rows} rows for {len(expected)} images "
            f"({len(duplicates)} paths twice, {len(missing)} missing, "
            f"e.g. {(duplicates or missing.to_pylist())[:2]}); nothing was committed"
        )
