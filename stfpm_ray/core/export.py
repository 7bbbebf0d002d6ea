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

import functools
import hashlib
import importlib.util
import math
import tempfile
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
# What the exporter imports, and what runs its graph, per runtime: the package's extras of the same names.
_EXPORTER = ("onnx", "onnxscript")
EXTRAS = {"onnxruntime": ("onnx", [*_EXPORTER, "onnxruntime"]), "openvino": ("openvino", [*_EXPORTER, "openvino"])}
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


def installed(runtime: str) -> bool:
    """Whether the exporter and ``runtime`` (``onnxruntime`` or ``openvino``) can be imported here."""
    return all(importlib.util.find_spec(name) is not None for name in EXTRAS[runtime][1])


def require_runtime(runtime: str = "onnxruntime") -> None:
    """Refuse in one line where the optional extra of ``runtime`` is not installed, before any work is done."""
    extra, modules = EXTRAS[runtime]
    if missing := [name for name in modules if importlib.util.find_spec(name) is None]:
        raise UserError(
            f"exporting and scoring with {runtime} need {', '.join(missing)}: pip install 'stfpm-ray[{extra}]' "
            f"({', '.join(modules)})"
        )


def export_onnx(model: STFPM, size: tuple[int, int]) -> bytes:
    """The serialised ONNX model of ``model`` (a scoring model, on CPU) for images of ``size`` (height, width)."""
    if missing := [name for name in _EXPORTER if importlib.util.find_spec(name) is None]:
        raise UserError(f"exporting needs {', '.join(missing)}: pip install 'stfpm-ray[onnx]'")
    images = torch.randint(0, 256, (_TRACE_BATCH, 3, *size), dtype=torch.uint8)
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


@functools.cache
def _builder_digest() -> str:
    """torch's version (the exporter) and the source of this package's core (what the graph is traced from)."""
    digest = hashlib.sha256(torch.__version__.encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def graph_key(meta: CheckpointMeta) -> str:
    """What names a category's exported graph where graphs are kept between runs
    (:class:`stfpm_ray.store.graph_cache.GraphCache`): its model and what built it, so that a graph kept by
    an older build is never taken for this one's."""
    return f"{meta.model_id}.{_builder_digest()}"


def checkpoint_sha256(folder: str | Path) -> str:
    """sha256 of the checkpoint's bytes, ``student.safetensors`` then ``stfpm.json``: which files were exported.

    Unlike ``model_id`` it also changes when ``calibrate`` adds an operating point, which the JSON records too.
    """
    location = resolve(folder)
    digest = hashlib.sha256(read_bytes(location.join(WEIGHTS_FILE)))
    digest.update(read_bytes(location.join(META_FILE)))
    return digest.hexdigest()


def openvino_ir(graph: bytes) -> dict[str, bytes]:
    """The ONNX ``graph`` as OpenVINO's own format: ``{".xml": topology, ".bin": weights}``, weights kept fp32
    (OpenVINO's ``save_model`` halves them to fp16 unless told not to, which would move every score)."""
    require_runtime("openvino")
    import openvino as ov

    with tempfile.TemporaryDirectory() as scratch:
        ov.save_model(ov.Core().read_model(graph), f"{scratch}/model.xml", compress_to_fp16=False)
        return {ext: Path(scratch, f"model{ext}").read_bytes() for ext in (".xml", ".bin")}


def export_record(folder: str | Path, meta: CheckpointMeta, model_file: str, fmt: str = "onnx") -> dict[str, Any]:
    """The JSON beside an exported model: everything a deployment needs to decide, and where it came from."""
    point = meta.operating_point
    return {
        "format": fmt,
        "model_file": model_file,
        "category": meta.category,
        "image_size": meta.image_size,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NCHW",
            "channels": "RGB",
            "height": meta.input_size[0],
            "width": meta.input_size[1],
        },
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
