"""Which runtime runs a scoring run's networks: PyTorch, or each category's exported graph in onnxruntime.

On CPU nodes the forward pass is most of a scoring actor's time, and onnxruntime ran the very same graph
faster than PyTorch on the machines measured (README: Export); PyTorch is the runtime with a GPU path here
and the only one that runs bf16. ``auto`` measures instead of assuming: the driver times both on probe images
with the actors' thread count and keeps the faster, since the ratio depends on the CPU, the threads and the
model. Graphs are exported from the checkpoints when the run starts and checked against PyTorch
(:func:`~stfpm_ray.core.exported.check_parity`) before any actor uses them, so either runtime flags the same
images; the rows record which one scored them.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from stfpm_ray.core.checkpoint import CheckpointMeta
from stfpm_ray.core.export import export_onnx, require_onnx
from stfpm_ray.core.exported import OnnxScorer, check_parity
from stfpm_ray.core.model import STFPM
from stfpm_ray.core.score import ScoringModels, cpu_chunk
from stfpm_ray.errors import UserError

RUNTIMES = ("auto", "torch", "onnxruntime")
# Probe images per timing and timings per runtime (the best counts): a few seconds on a CPU at 256 px.
_PROBE_IMAGES = 8
_REPEATS = 3


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime a run scores with, why (for its start line), and the checked graph of each category."""

    runtime: str
    reason: str
    graphs: dict[str, bytes] = field(default_factory=dict, repr=False)


def choose_runtime(
    requested: str,
    device: str,
    precisions: Mapping[str, str],
    checkpoints: Mapping[str, tuple[str, CheckpointMeta]],
    threads: int,
) -> RuntimeChoice:
    """Resolve ``--runtime`` for actors on ``device`` with ``threads`` each; ``precisions`` is each category's
    resolved precision. An explicit ``onnxruntime`` that cannot run as asked is refused in one line."""
    if requested not in RUNTIMES:
        raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    if requested == "torch":
        return RuntimeChoice("torch", "as asked")
    bf16 = sorted(name for name, precision in precisions.items() if precision != "fp32")
    not_here = (
        "the scoring actors run on GPUs" if device == "cuda" else f"{', '.join(bf16)} score in bf16" if bf16 else None
    )
    if requested == "auto":
        if not_here:
            return RuntimeChoice("torch", f"auto: {not_here}, which PyTorch runs")
        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
            return RuntimeChoice("torch", "auto: onnxruntime is not installed (pip install 'stfpm-ray[onnx]')")
    elif not_here:
        raise UserError(
            f"--runtime onnxruntime runs fp32 on CPUs, but {not_here}: use --runtime torch, or --gpus-per-actor 0 "
            "and --precision fp32"
        )
    require_onnx()
    models = ScoringModels(checkpoints)
    graphs: dict[str, bytes] = {}
    reason = "as asked"
    for name in sorted(checkpoints):
        model, meta = models(name)
        graphs[name] = export_onnx(model, meta.image_size)
        check_parity(model, meta, graphs[name])
        if requested == "auto" and len(graphs) == 1:
            torch_rate, onnx_rate = measure_rates(model, graphs[name], meta.image_size, threads)
            speed = f"{onnx_rate / torch_rate:.2f}x PyTorch's images/s on {threads} thread(s), measured"
            if onnx_rate <= torch_rate:
                return RuntimeChoice("torch", f"auto: onnxruntime ran {speed}")
            reason = f"auto: {speed}"
    return RuntimeChoice("onnxruntime", reason, graphs)


def measure_rates(model: STFPM, graph: bytes, image_size: int, threads: int) -> tuple[float, float]:
    """Images/s of PyTorch (in the actors' chunks) and of onnxruntime on the same probe images and threads."""
    images = torch.randint(0, 256, (_PROBE_IMAGES, 3, image_size, image_size), dtype=torch.uint8)
    onnx = OnnxScorer(graph, threads)
    chunk = cpu_chunk("cpu", threads) or _PROBE_IMAGES
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch_s = _best_time(lambda: [model.predict(images[i : i + chunk]) for i in range(0, len(images), chunk)])
    finally:
        torch.set_num_threads(before)
    onnx_s = _best_time(lambda: onnx.predict(images))
    return _PROBE_IMAGES / torch_s, _PROBE_IMAGES / onnx_s


def _best_time(run: Callable[[], object]) -> float:
    """The fastest of ``_REPEATS`` timed calls after one warm-up call."""
    run()
    times = []
    for _ in range(_REPEATS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)
