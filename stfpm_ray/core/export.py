"""Exporting a category's scoring model to one self-contained ONNX file, and the JSON that goes beside it.

The graph is the scoring model itself (:func:`stfpm_ray.core.score.load_scoring_model`: normalisation,
teacher and student with BatchNorm folded and unused blocks dropped, the anomaly map and its maximum), traced
through its own :meth:`~stfpm_ray.core.model.STFPM.predict` in fp32, so an exported model cannot drift from
what ``score`` computes: there is no second implementation to keep in step. It reads uint8 NCHW RGB images
at the trained size, any batch size, and returns ``score`` (N,) and ``anomaly_map`` (N, H, W), float32.

The decision is not in the graph: the JSON carries the operating point in force, so a deployment compares
``score > threshold`` itself, and a later ``calibrate`` needs a new JSON, not a new graph.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stfpm_ray import __version__
from stfpm_ray.core.checkpoint import META_FILE, WEIGHTS_FILE, CheckpointMeta
from stfpm_ray.core.model import STFPM
from stfpm_ray.errors import UserError
from stfpm_ray.store.fs import read_bytes, resolve

INPUT_NAME = "images"
OUTPUT_NAMES = ("score", "anomaly_map")
# Well inside what every onnxruntime the extra allows runs (1.18 runs opsets up to 21), so an older runtime
# beside a camera loads the file too.
OPSET = 18
# What the exporter and the check after it import: the `onnx` extra of the package.
_EXTRA_MODULES = ("onnx", "onnxscript", "onnxruntime")
# The example batch the graph is traced with; the batch dimension stays dynamic.
_TRACE_BATCH = 2


class ExportedScorer(nn.Module):
    """uint8 NCHW images -> (image scores, anomaly maps): the scoring model's own ``predict`` in fp32."""

    def __init__(self, model: STFPM) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        maps, scores = self.model.predict(images, "fp32")
        return scores, maps


def require_onnx() -> None:
    """Refuse in one line where the optional ``onnx`` extra is not installed, before any work is done."""
    missing = [name for name in _EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"ONNX export and scoring need {', '.join(missing)}: pip install 'stfpm-ray[onnx]' "
            "(onnx, onnxruntime, onnxscript)"
        )


def export_onnx(model: STFPM, image_size: int) -> bytes:
    """The serialised ONNX model of ``model`` (a scoring model, on CPU) for ``image_size`` square images."""
    require_onnx()
    images = torch.randint(0, 256, (_TRACE_BATCH, 3, image_size, image_size), dtype=torch.uint8)
    program = torch.onnx.export(
        ExportedScorer(model).eval(),
        (images,),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return program.model_proto.SerializeToString()


def checkpoint_sha256(folder: str | Path) -> str:
    """sha256 of the checkpoint's bytes, ``student.safetensors`` then ``stfpm.json``: which files were exported.

    Unlike ``model_id`` it also changes when ``calibrate`` adds an operating point, which the JSON records too.
    """
    location = resolve(folder)
    digest = hashlib.sha256(read_bytes(location.join(WEIGHTS_FILE)))
    digest.update(read_bytes(location.join(META_FILE)))
    return digest.hexdigest()


def export_record(folder: str | Path, meta: CheckpointMeta, model_file: str) -> dict[str, Any]:
    """The JSON beside an exported model: everything a deployment needs to decide, and where it came from."""
    point = meta.operating_point
    return {
        "format": "onnx",
        "model_file": model_file,
        "category": meta.category,
        "image_size": meta.image_size,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "channels": "RGB"},
        "outputs": list(OUTPUT_NAMES),
        "threshold": point.threshold,
        # null for checkpoints older than the record of their target (their threshold is the validation maximum)
        "target_far": None if math.isnan(point.target_far) else point.target_far,
        "operating_point": point.id,
        "model_id": meta.model_id,
        "checkpoint_sha256": checkpoint_sha256(folder),
        "backbone": meta.backbone,
        "opset": OPSET,
        "stfpm_ray_version": __version__,
    }
