"""Running an exported model with onnxruntime or OpenVINO, and checking it against the PyTorch scoring model.

:func:`parity` is the promise of an export: on the same images, scores and maps within
``PARITY_TOLERANCE`` of PyTorch's (in units of the threshold, so the figure means the same for every
category) and the same images flagged. ``export`` and scoring runs with ``--runtime`` check it on probe images
before they use a graph; the tests and ``benchmarks/export_parity.py`` check it on real ones.
:data:`SCORERS` puts each runtime behind the scoring model's own ``predict``, so the scoring code runs any.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stfpm_ray.core.checkpoint import CheckpointMeta
from stfpm_ray.core.export import INPUT_NAME, OUTPUT_NAMES, require_runtime
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
    require_runtime("onnxruntime")
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


def check_parity(model: STFPM, meta: CheckpointMeta, graph: bytes, runtime: str = "onnxruntime") -> None:
    """Run the exported graph in ``runtime`` on probe images and refuse it unless it scores them as the PyTorch
    model does."""
    images = torch.randint(
        0, 256, (_PROBE_BATCH, 3, *meta.input_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    expected = tuple(t.numpy() for t in model.predict(images, "fp32"))
    got = tuple(t.numpy() for t in SCORERS[runtime](graph, None).predict(images))
    check = parity(expected, got, meta.operating_point.threshold)
    if not check.holds:
        raise RuntimeError(f"the exported {meta.category} model does not score in {runtime} as in PyTorch: {check}")


class OnnxScorer:
    """A category's exported graph (bytes or a file) in onnxruntime behind the scoring model's ``predict`` (fp32
    only: the graph is fp32)."""

    runtime = "onnxruntime"

    def __init__(self, graph: bytes | str, threads: int | None) -> None:
        self.session = onnx_session(graph, threads)

    def predict(self, images: Tensor, precision: str = "fp32") -> tuple[Tensor, Tensor]:
        _same_precision(precision, "fp32")
        maps, scores = predict_onnx(self.session, images.cpu().numpy())
        return torch.from_numpy(maps), torch.from_numpy(scores)


class OpenVinoScorer:
    """The same graph (ONNX bytes, or an OpenVINO IR ``.xml`` file beside its ``.bin``) compiled by OpenVINO for
    the CPU, in fp32 unless ``precision`` says bf16: OpenVINO would otherwise pick bf16 on CPUs that have it (its
    default precision hint), and thresholds are set on fp32 scores. Scoring runs offer only fp32; bf16 is there
    for ``benchmarks/export_speed.py`` to measure what it would buy."""

    runtime = "openvino"

    def __init__(self, graph: bytes | str, threads: int | None, precision: str = "fp32") -> None:
        require_runtime("openvino")
        import openvino as ov

        self.precision = precision
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision]}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(graph), "CPU", config)

    def predict(self, images: Tensor, precision: str = "fp32") -> tuple[Tensor, Tensor]:
        _same_precision(precision, self.precision)
        outputs = self.compiled(np.ascontiguousarray(images.cpu().numpy(), dtype=np.uint8))
        scores, maps = (outputs[self.compiled.output(name)] for name in OUTPUT_NAMES)
        return torch.from_numpy(np.asarray(maps)), torch.from_numpy(np.asarray(scores))


def _same_precision(asked: str, compiled: str) -> None:
    if asked != compiled:
        raise ValueError(f"this exported graph runs {compiled}, got {asked!r}")


# Runtimes of exported graphs: name -> scorer class (its constructor takes the graph and intra-op threads).
SCORERS: dict[str, type[OnnxScorer] | type[OpenVinoScorer]] = {"onnxruntime": OnnxScorer, "openvino": OpenVinoScorer}
