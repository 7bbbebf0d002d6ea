"""The checkpoint format: one folder per category, student weights plus a JSON of metadata.

``student.safetensors`` holds the student's tensors (loading executes no pickle), ``stfpm.json`` holds what
is needed to rebuild the model and to trust its scores: format version, backbone, layers, image size,
teacher source and hash, the validation-derived threshold and normalisation, and training figures.
The teacher is never stored: it is rebuilt from its source and checked against the recorded hash. Folders
may be local paths or URIs: every byte goes through :mod:`stfpm_ray.store.fs`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from stfpm_ray.core.model import STFPM
from stfpm_ray.core.teacher import Teacher, load_teacher
from stfpm_ray.errors import UserError
from stfpm_ray.store.fs import is_file, read_bytes, read_text, resolve, write_bytes_atomic, write_text_atomic

FORMAT_VERSION = 1
WEIGHTS_FILE = "student.safetensors"
META_FILE = "stfpm.json"


class CheckpointError(UserError):
    """A checkpoint folder that is missing, of another format, or made for another teacher."""


@dataclass
class CheckpointMeta:
    """Everything a scorer needs besides the weights; ``model_id`` identifies weights + threshold."""

    category: str
    backbone: str
    layers: list[int]
    image_size: int
    teacher_source: str
    teacher_sha256: str
    threshold: float
    normalization: dict[str, float]
    training: dict[str, Any] = field(default_factory=dict)
    # How levels combine into the map: product, or sum with these validation scales (core.anomaly_map).
    # Checkpoints written before the option existed lack both fields and score with the product.
    combine: str = "product"
    level_scales: list[float] | None = None
    model_id: str = ""
    format_version: int = FORMAT_VERSION

    def normalize(self, score: float) -> float:
        """Score divided by the threshold: 1.0 is the decision boundary, comparable across categories."""
        return score / self.threshold if self.threshold > 0 else float("nan")


def _model_id(weights: bytes, meta: CheckpointMeta) -> str:
    digest = hashlib.sha256(weights)
    digest.update(f"{meta.teacher_sha256}:{meta.image_size}:{meta.threshold!r}".encode())
    if meta.level_scales is not None:  # the map itself depends on them
        digest.update(repr([float(v) for v in meta.level_scales]).encode())
    return digest.hexdigest()[:16]


def save_checkpoint(folder: str | Path, student: torch.nn.Module, meta: CheckpointMeta) -> CheckpointMeta:
    """Write weights and metadata into a folder or URI; the JSON is written last, and every file atomically, so
    the JSON marks completeness."""
    location = resolve(folder)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in student.state_dict().items()}
    weights = save(state, metadata={"format_version": str(FORMAT_VERSION)})
    write_bytes_atomic(location.join(WEIGHTS_FILE), weights)
    meta.model_id = _model_id(weights, meta)
    write_text_atomic(location.join(META_FILE), json.dumps(asdict(meta), indent=2, sort_keys=True))
    return meta


def read_meta(folder: str | Path) -> CheckpointMeta:
    """Read and validate the metadata of a checkpoint folder."""
    path = resolve(folder).join(META_FILE)
    if not is_file(path):
        raise CheckpointError(f"{folder} is not a checkpoint: {META_FILE} is missing (train one with `stfpm-ray train`)")
    raw = json.loads(read_text(path))
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} has checkpoint format version {version}; this stfpm-ray reads version {FORMAT_VERSION}"
        )
    try:
        return CheckpointMeta(**raw)
    except TypeError as exc:
        raise CheckpointError(f"{path.name} has unexpected fields: {exc}") from exc


def load_checkpoint(
    folder: str | Path, teacher: Teacher | None = None, device: str | torch.device = "cpu"
) -> tuple[STFPM, CheckpointMeta]:
    """Rebuild the model of a checkpoint, refusing one whose teacher or backbone does not match.

    Pass ``teacher`` to share one loaded teacher between the students of many categories.
    """
    meta = read_meta(folder)
    if teacher is None:
        teacher = load_teacher(meta.backbone, tuple(meta.layers), meta.teacher_source)
    if (teacher.backbone, tuple(teacher.layers)) != (meta.backbone, tuple(meta.layers)):
        raise CheckpointError(
            f"{folder} is a {meta.backbone} student with layers {meta.layers}; the teacher at hand is "
            f"{teacher.backbone} with layers {list(teacher.layers)}"
        )
    if teacher.sha256 != meta.teacher_sha256:
        raise CheckpointError(
            f"{folder} was trained against teacher {meta.teacher_source} ({meta.teacher_sha256[:12]}), "
            f"but the teacher at hand is {teacher.source} ({teacher.sha256[:12]}); scores would be meaningless"
        )
    model = STFPM(teacher, meta.backbone, meta.layers)
    model.level_scales = tuple(meta.level_scales) if meta.level_scales is not None else None
    state = load(read_bytes(resolve(folder).join(WEIGHTS_FILE)))
    try:
        model.student.load_state_dict(state)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0][:300]
        raise CheckpointError(f"{folder}: student weights do not fit backbone {meta.backbone!r} ({detail})") from exc
    return model.to(device).eval(), meta
