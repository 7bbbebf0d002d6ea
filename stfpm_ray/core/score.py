"""Scoring decoded images: predict -> shrink map -> encode map -> normalise -> threshold.

:func:`score_batch` is the whole scoring step of the method for one category; :func:`score_block` applies it
to a decoded block of a plan (rows of several categories, some already failed) and returns the block's rows
of the scores table. The Ray actor (:mod:`stfpm_ray.ray.pipeline`) is :func:`score_block` plus Ray plumbing,
and the benchmarks time these same functions. :class:`ScoringModels` prepares checkpoints for them (networks
rewritten for inference, one teacher shared between categories).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch

from stfpm_ray.core.anomaly_map import shrink_maps
from stfpm_ray.core.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, read_meta
from stfpm_ray.core.exported import SCORERS, OnnxScorer, OpenVinoScorer
from stfpm_ray.core.inference_graph import optimize_for_inference
from stfpm_ray.core.model import STFPM, resolve_precision
from stfpm_ray.core.teacher import Teacher, load_teacher
from stfpm_ray.data.images import Size, height_width
from stfpm_ray.store.mapcodec import encode_map
from stfpm_ray.store.scores import RESULT_FIELDS, SCHEMA

DEFAULT_MAP_SIZE = 128
# What scores a batch: the PyTorch scoring model, or a category's exported graph in another runtime.
Predictor = STFPM | OnnxScorer | OpenVinoScorer
# Images per forward pass and torch thread on CPU: a large batch's activations fall out of the caches, so
# CPUs run the forward in small chunks (README: speed). GPUs take the whole batch.
CPU_CHUNK = 4


@dataclass(frozen=True)
class ScoreSettings:
    """How a batch is scored: stored map's short side, network precision (``auto``/``fp32``/``bf16``, ``auto`` resolved
    per category by :func:`~stfpm_ray.core.model.resolve_precision`), forward chunk size."""

    map_size: int = DEFAULT_MAP_SIZE
    precision: str = "fp32"
    chunk: int | None = None  # None: the whole batch in one forward pass


@dataclass(frozen=True)
class ScoredImage:
    """One image's result, as stored in a scores row (``stfpm_ray.store.scores.RESULT_FIELDS``)."""

    score: float
    score_norm: float
    is_anomalous: bool
    anomaly_map: bytes  # 16-bit PNG, see stfpm_ray.store.mapcodec
    map_scale: float
    runtime: str  # what ran the networks: torch, onnxruntime or openvino (stfpm_ray.core.runtimes)


def cpu_chunk(device: str, threads: int) -> int | None:
    """The forward chunk the scorer uses on ``device``: ``CPU_CHUNK`` images per thread on CPU, whole batches
    elsewhere."""
    return CPU_CHUNK * threads if torch.device(device).type == "cpu" else None


def load_scoring_model(
    folder: str, device: str | torch.device = "cpu", teachers: dict[tuple, Teacher] | None = None
) -> tuple[STFPM, CheckpointMeta]:
    """A checkpoint rewritten for inference; ``teachers`` caches rewritten teachers across categories."""
    meta = read_meta(folder)
    key = (meta.backbone, tuple(meta.layers), meta.teacher_source)
    teachers = {} if teachers is None else teachers
    if key not in teachers:
        teacher = load_teacher(*key)
        teacher.network = optimize_for_inference(teacher.network)
        teachers[key] = teacher
    model, meta = load_checkpoint(folder, teachers[key], device)
    return model.for_inference(), meta


class ScoringModels:
    """The scoring models of a run's categories, each loaded on first use, one teacher per backbone.

    A scoring process may be sent any category's images, and most runs hold many categories of one teacher:
    loading lazily keeps a process's memory to the categories it meets, sharing keeps one teacher for all.
    ``checkpoints`` maps each category to its folder and the metadata the run validated: a whole run decides
    with the operating points it started with, even if ``calibrate`` adds one while it runs.
    ``graphs`` gives the categories that run as exported graphs in ``runtime`` (onnxruntime or openvino,
    :mod:`stfpm_ray.core.runtimes`, checked against PyTorch when the run started): a call that returns the
    graph's bytes, made on first use, so a process fetches only the graphs of the categories it meets.
    """

    def __init__(
        self,
        checkpoints: Mapping[str, tuple[str, CheckpointMeta]],
        device: str | torch.device = "cpu",
        graphs: Mapping[str, Callable[[], bytes]] | None = None,
        threads: int = 1,
        runtime: str = "torch",
    ) -> None:
        self.checkpoints, self.device = dict(checkpoints), device
        self.graphs, self.threads, self.runtime = dict(graphs or {}), threads, runtime
        self.loaded: dict[str, tuple[Predictor, CheckpointMeta]] = {}
        self.teachers: dict[tuple, Teacher] = {}

    def __call__(self, category: str) -> tuple[Predictor, CheckpointMeta]:
        if category not in self.loaded and category in self.graphs:
            scorer = SCORERS[self.runtime](self.graphs[category](), self.threads)
            self.loaded[category] = scorer, self.checkpoints[category][1]
        if category not in self.loaded:
            folder, meta = self.checkpoints[category]
            model, found = load_scoring_model(folder, self.device, self.teachers)
            if found.model_id != meta.model_id:
                raise CheckpointError(f"{folder} was replaced while this run was scoring with it; run again")
            self.loaded[category] = model, meta
        return self.loaded[category]


def score_batch(
    model: Predictor, meta: CheckpointMeta, images: torch.Tensor, settings: ScoreSettings = ScoreSettings()
) -> list[ScoredImage]:
    """Score uint8 NCHW ``images`` (already on the model's device) with one category's model, deciding
    ``is_anomalous`` with its operating point in force (``auto`` precision: the one it was calibrated in)."""
    chunk = settings.chunk or len(images)
    point = meta.operating_point
    threshold, precision = point.threshold, resolve_precision(settings.precision, images.device, point.precision)
    results = []
    for start in range(0, len(images), chunk):
        maps, scores = model.predict(images[start : start + chunk], precision)
        small = shrink_maps(maps, settings.map_size)
        for score, anomaly_map in zip(scores.float().cpu().tolist(), small.float().cpu().numpy()):
            png, scale = encode_map(anomaly_map)
            normalized = score / threshold if threshold > 0 else float("nan")
            results.append(ScoredImage(score, normalized, score > threshold, png, scale, model.runtime))
    return results


def score_block(block: pa.Table, models: ScoringModels, settings: ScoreSettings, run_id: str) -> pa.Table:
    """The scores rows of a decoded block (``stfpm_ray.data.plan.DECODED_SCHEMA``), in its order.

    Rows that arrive with an error keep it (status ``error``, no result); the others are scored in one
    :func:`score_batch` per (category, input size).
    """
    rows = block.to_pylist()
    groups: dict[tuple[str, int, int], list[int]] = {}
    for i, row in enumerate(rows):
        if row["error"] is None:
            groups.setdefault((row["category"], row["input_height"], row["input_width"]), []).append(i)
    scored: dict[int, dict] = {}
    for (category, height, width), index in groups.items():
        model, meta = models(category)
        images = pixels_to_batch([rows[i]["pixels"] for i in index], (height, width), models.device)
        scored.update(zip(index, map(asdict, score_batch(model, meta, images, settings))))
    now = datetime.now(timezone.utc)
    missing = dict.fromkeys(field.name for field in RESULT_FIELDS)
    out = [
        {
            **row,
            **scored.get(i, missing),
            "run_id": run_id,
            "scored_at": now,
            "status": "ok" if i in scored else "error",
        }
        for i, row in enumerate(rows)
    ]
    return pa.Table.from_pylist(out, schema=SCHEMA)


def pixels_to_batch(
    pixels: list[bytes] | list[np.ndarray], size: Size, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Decoded HxWx3 uint8 images of ``size`` (raw bytes or arrays) as one NCHW tensor on ``device``.

    The NCHW tensor is a view in channels_last order (no copy); on a GPU it is copied from page-locked
    memory, which lets the copy run asynchronously.
    """
    height, width = height_width(size)
    arrays = [np.frombuffer(p, dtype=np.uint8).reshape(height, width, 3) if isinstance(p, bytes) else p for p in pixels]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if torch.device(device).type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch
