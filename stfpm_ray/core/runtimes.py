"""Which runtime runs a scoring run's networks: PyTorch, or each category's exported graph in onnxruntime or
OpenVINO.

On CPU nodes the forward pass is most of a scoring actor's time, and both runtimes ran the very same graph
faster than PyTorch on the machines measured (README: Export); PyTorch is the runtime with a GPU path here
and the only one that runs bf16. ``auto`` measures instead of assuming: the driver times PyTorch and every
installed runtime on probe images with the actors' thread count and keeps the fastest, since the ratio
depends on the CPU, the threads and the model. Graphs are exported from the checkpoints when the run starts
and checked against PyTorch in the runtime that will run them (:func:`~stfpm_ray.core.exported.check_parity`)
before any actor uses them, so every runtime flags the same images; the rows record which one scored them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from stfpm_ray.core.checkpoint import CheckpointMeta
from stfpm_ray.core.export import EXTRAS, export_onnx, graph_key, installed, require_runtime
from stfpm_ray.core.exported import SCORERS, check_parity
from stfpm_ray.core.model import STFPM
from stfpm_ray.core.score import ScoringModels, cpu_chunk
from stfpm_ray.errors import UserError
from stfpm_ray.store.graph_cache import GraphCache

EXPORTED = tuple(SCORERS)
RUNTIMES = ("auto", "torch", *EXPORTED)
# Probe images per timing and timings per runtime (the best counts): a few seconds on a CPU at 256 px.
_PROBE_IMAGES = 8
_REPEATS = 3


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime a run scores with, why (for its start line), and the checked graph of each category."""

    runtime: str
    reason: str
    graphs: dict[str, bytes] = field(default_factory=dict, repr=False)


def refusal(runtime: str, device: str, precisions: Mapping[str, str]) -> str | None:
    """Why an exported graph cannot score this run (None: it can): the graphs are fp32 on CPUs."""
    if runtime == "torch":
        return None
    if device == "cuda":
        return "the scoring actors run on GPUs"
    bf16 = sorted(name for name, precision in precisions.items() if precision != "fp32")
    return f"{', '.join(bf16)} score in bf16" if bf16 else None


def check_request(requested: str, device: str, precisions: Mapping[str, str]) -> None:
    """Refuse in one line a ``--runtime`` that does not exist, cannot run as asked or is not installed; the
    options check it when parsed (``device``, ``precisions`` as far as known then) and
    :func:`choose_runtime` again once GPUs and each category's precision are resolved."""
    if requested not in RUNTIMES:
        raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    if requested not in EXPORTED:
        return
    not_here = refusal(requested, device, precisions)
    if not_here:
        raise UserError(
            f"--runtime {requested} runs fp32 on CPUs, but {not_here}: use --runtime torch, or "
            "--gpus-per-actor 0 and --precision fp32"
        )
    require_runtime(requested)


def choose_runtime(
    requested: str,
    device: str,
    precisions: Mapping[str, str],
    checkpoints: Mapping[str, tuple[str, CheckpointMeta]],
    threads: int,
    cache: GraphCache | None = None,
) -> RuntimeChoice:
    """Resolve ``--runtime`` for actors on ``device`` with ``threads`` each; ``precisions`` is each category's
    resolved precision. An explicit runtime that cannot run as asked is refused in one line. Graphs kept in
    ``cache`` by earlier runs are used instead of exporting again, once they pass the same parity check."""
    check_request(requested, device, precisions)
    if requested == "torch":
        return RuntimeChoice("torch", "as asked")
    models = ScoringModels(checkpoints)
    if requested != "auto":
        return RuntimeChoice(requested, "as asked", _checked_graphs(models, requested, cache))
    not_here = refusal(requested, device, precisions)
    if not_here:
        return RuntimeChoice("torch", f"auto: {not_here}, which PyTorch runs")
    candidates = [name for name in EXPORTED if installed(name)]
    if not candidates:
        extras = " or ".join(f"'stfpm-ray[{EXTRAS[name][0]}]'" for name in EXPORTED)
        return RuntimeChoice("torch", f"auto: no other runtime installed (pip install {extras})")
    first = next(iter(sorted(checkpoints)))
    model, meta = models(first)
    graph = _checked_graph(model, meta, candidates[0], cache)
    rates = measure_rates(model, graph, meta.input_size, threads, candidates)
    fastest = max(rates, key=rates.__getitem__)
    measured = ", ".join(f"{name} {rate:.1f}" for name, rate in sorted(rates.items(), key=lambda kv: -kv[1]))
    reason = f"auto: measured images/s on {threads} thread(s): {measured}"
    if fastest == "torch":
        return RuntimeChoice("torch", reason)
    return RuntimeChoice(fastest, reason, _checked_graphs(models, fastest, cache, {first: graph}))


def _checked_graphs(
    models: ScoringModels, runtime: str, cache: GraphCache | None, made: Mapping[str, bytes] | None = None
) -> dict[str, bytes]:
    """Each category's exported graph (``made``: those this run has already), checked against PyTorch in
    ``runtime``."""
    made = made or {}
    return {name: _checked_graph(*models(name), runtime, cache, made.get(name)) for name in sorted(models.checkpoints)}


def _checked_graph(
    model: STFPM, meta: CheckpointMeta, runtime: str, cache: GraphCache | None, made: bytes | None = None
) -> bytes:
    """``made`` if given, else the category's graph kept in ``cache`` if it scores as ``model`` does in
    ``runtime``, else a new export (checked the same way, then kept)."""
    if made is not None:
        check_parity(model, meta, made, runtime)
        return made
    key = graph_key(meta)
    kept = cache.get(meta.category, key) if cache is not None else None
    if kept is not None:
        try:
            check_parity(model, meta, kept, runtime)
            return kept
        except Exception:  # a damaged or foreign file fails in the runtime's own ways: export again instead
            pass
    graph = export_onnx(model, meta.input_size)
    check_parity(model, meta, graph, runtime)
    if cache is not None:
        cache.put(meta.category, key, graph)
    return graph


def measure_rates(
    model: STFPM, graph: bytes, size: tuple[int, int], threads: int, runtimes: list[str]
) -> dict[str, float]:
    """Images/s of PyTorch (in the actors' chunks) and of each of ``runtimes`` on the same probe images and
    threads."""
    images = torch.randint(0, 256, (_PROBE_IMAGES, 3, *size), dtype=torch.uint8)
    chunk = cpu_chunk("cpu", threads) or _PROBE_IMAGES
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rates = {"torch": _rate(lambda: [model.predict(images[i : i + chunk]) for i in range(0, len(images), chunk)])}
    finally:
        torch.set_num_threads(before)
    for name in runtimes:
        scorer = SCORERS[name](graph, threads)
        rates[name] = _rate(lambda scorer=scorer: scorer.predict(images))
    return rates


def _rate(run: Callable[[], object]) -> float:
    """Probe images per second of the fastest of ``_REPEATS`` timed calls after one warm-up call."""
    run()
    times = []
    for _ in range(_REPEATS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return _PROBE_IMAGES / min(times)
