"""Running an exported model with onnxruntime, and checking it against the PyTorch scoring model.

:func:`parity` is the promise of an export: on the same images, scores and maps within
``PARITY_TOLERANCE`` of PyTorch's (in units of the threshold, so the figure means the same for every
category) and the same images flagged. ``export`` checks it on probe images before writing anything; the
tests and ``benchmarks/export_parity.py`` check it on real ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stfpm_ray.core.checkpoint import CheckpointMeta
from stfpm_ray.core.export import INPUT_NAME, require_onnx
from stfpm_ray.core.model import STFPM

# Largest score or map difference allowed, relative to the threshold: the normalised score may move by 1e-4.
# Both sides run the same fp32 graph; only operation order and kernels differ (measured: about 1e-6).
PARITY_TOLERANCE = 1e-4
# Probe images of a parity check: another batch size than the traced one, so the dynamic batch is exercised.
_PROBE_BATCH = 3


def onnx_session(model: bytes | str, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of an exported model (bytes or a file), every graph optimisation on.

    ``threads`` sets the intra-op thread pool (None: onnxruntime's default, one per core).
    """
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def predict_onnx(session: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps (N, H, W) and image scores (N,) of uint8 NCHW ``images``, as ``STFPM.predict`` returns."""
    scores, maps = session.run(None, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})
    return maps, scores


@dataclass(frozen=True)
class Parity:
    """How far an exported model's outputs are from PyTorch's on the same images."""

    max_score_diff: float
    max_map_diff: float
    tolerance: float  # absolute: PARITY_TOLERANCE times the threshold
    same_flagged: bool

    @property
    def holds(self) -> bool:
        return self.max_score_diff <= self.tolerance and self.max_map_diff <= self.tolerance and self.same_flagged


def parity(
    torch_out: tuple[np.ndarray, np.ndarray], onnx_out: tuple[np.ndarray, np.ndarray], threshold: float
) -> Parity:
    """Compare ``(maps, scores)`` of PyTorch and of the exported model, deciding both at ``threshold``."""
    (torch_maps, torch_scores), (onnx_maps, onnx_scores) = torch_out, onnx_out
    return Parity(
        max_score_diff=float(np.abs(torch_scores - onnx_scores).max(initial=0.0)),
        max_map_diff=float(np.abs(torch_maps - onnx_maps).max(initial=0.0)),
        tolerance=PARITY_TOLERANCE * threshold,
        same_flagged=bool(np.array_equal(torch_scores > threshold, onnx_scores > threshold)),
    )


def check_parity(model: STFPM, meta: CheckpointMeta, graph: bytes) -> None:
    """Run the exported graph on probe images and refuse it unless it scores them as the PyTorch model does."""
    size = meta.image_size
    images = torch.randint(
        0, 256, (_PROBE_BATCH, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    expected = tuple(t.numpy() for t in model.predict(images, "fp32"))
    check = parity(expected, predict_onnx(onnx_session(graph), images.numpy()), meta.operating_point.threshold)
    if not check.holds:
        raise RuntimeError(f"the exported {meta.category} model does not score as PyTorch does: {check}")


class OnnxScorer:
    """A category's exported graph in onnxruntime behind the scoring model's ``predict``, so that
    :func:`stfpm_ray.core.score.score_batch` runs either runtime unchanged (fp32 only: the graph is fp32)."""

    runtime = "onnxruntime"

    def __init__(self, graph: bytes, threads: int) -> None:
        self.session = onnx_session(graph, threads)

    def predict(self, images: Tensor, precision: str = "fp32") -> tuple[Tensor, Tensor]:
        if precision != "fp32":
            raise ValueError(f"an exported graph runs fp32, got {precision!r}")
        maps, scores = predict_onnx(self.session, images.cpu().numpy())
        return torch.from_numpy(maps), torch.from_numpy(scores)
