"""What runs in every Ray Train worker of one category: the core's fit recipe with a report hook.

Each worker runs :func:`~stfpm_ray.core.fit.fit_category`; after every epoch rank 0 reports its metrics,
except that epochs shorter than ``REPORT_INTERVAL_S`` are reported together: Ray Train collects one report per
controller poll (2 s), so a report per sub-second epoch (small categories, GPUs) would stall the loop. Each
report carries every epoch since the last one, so the driver still prints one line per epoch. A report
carries a resumable checkpoint (:func:`~stfpm_ray.core.fit.resume_state`, tens of MB with the optimizer
state) at most every ``CHECKPOINT_INTERVAL_S``, the first report always. The last report is the core checkpoint
format itself, which the driver installs (:mod:`stfpm_ray.ray.trainer`).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from timm.layers import convert_sync_batchnorm

from stfpm_ray.core.checkpoint import META_FILE, save_checkpoint
from stfpm_ray.core.fit import StudentFitter, TrainConfig, fit_category, resume_state
from stfpm_ray.core.model import STFPM
from stfpm_ray.core.students import student_kind
from stfpm_ray.core.teacher import WeightsError
from stfpm_ray.data.mvtec import DatasetError

STATE_FILE = "train_state.pt"
# Ray Train's controller collects one report per worker per poll (every 2 s by default) and a worker's next
# report waits for that: epochs shorter than this are reported (and checkpointed) together.
REPORT_INTERVAL_S = 2.0
# A resumable checkpoint is written to Ray Train storage (often object storage) at most this often: a crash
# then repeats at most this much training, and as it resumes from the exact state (optimizer, batch order,
# best epoch so far) the result is the same; a checkpoint per report would upload tens of MB every 2 s, a
# large share of a GPU's training time. The final checkpoint is always reported.
CHECKPOINT_INTERVAL_S = 30.0


def _report_checkpoint(metrics: dict[str, Any], write: Callable[[Path], object] | None) -> None:
    """Report on every rank (a barrier); only rank 0 attaches a checkpoint folder filled by ``write`` (None:
    no checkpoint)."""
    if write is None or ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="stfpm-ckpt-") as folder:
        write(Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision on every rank: reports are collective, so every rank must make the same ones."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    decision = torch.tensor([int(flag)], device=device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def _save_state(fitter: StudentFitter, folder: Path) -> None:
    torch.save(resume_state(fitter), folder / STATE_FILE)


class _Reporter:
    """The fit recipe's epoch hook in a Train worker: reports epochs (batched, see REPORT_INTERVAL_S), with a
    resumable checkpoint at most every CHECKPOINT_INTERVAL_S. Each report carries the epochs since the
    previous one ("history"), so the driver prints every epoch."""

    def __init__(self, device: torch.device, resumed_from: int | None) -> None:
        self.device, self.resumed_from = device, resumed_from
        self.history: list[dict[str, Any]] = []
        self.last_report = time.monotonic()
        self.last_checkpoint = -math.inf

    def take_extras(self, fitter: StudentFitter) -> dict[str, Any]:
        """``history`` and ``started_at`` of the next report (and ``resumed_from`` once after a restart)."""
        extras: dict[str, Any] = {"history": tuple(self.history), "started_at": fitter.started_at}
        if self.resumed_from is not None:
            extras["resumed_from"], self.resumed_from = self.resumed_from, None
        self.history, self.last_report = [], time.monotonic()
        return extras

    def __call__(self, fitter: StudentFitter, metrics: dict[str, Any]) -> None:
        epoch = {key: value for key, value in metrics.items() if key != "category"}
        self.history.append(epoch)
        due = time.monotonic() - self.last_report >= REPORT_INTERVAL_S and fitter.epoch < fitter.config.epochs
        if _rank0_decides(due, self.device):
            # A tuple: Tune's TensorBoard logger would try to plot a list as a histogram.
            report = {**epoch, **self.take_extras(fitter)}
            checkpoint = time.monotonic() - self.last_checkpoint >= CHECKPOINT_INTERVAL_S
            if checkpoint:
                self.last_checkpoint = time.monotonic()
            _report_checkpoint(report, partial(_save_state, fitter) if checkpoint else None)


def _previous_state() -> tuple[bool, dict[str, Any] | None]:
    """(final checkpoint already reported, resumable state or None) from the last reported checkpoint."""
    previous = ray.train.get_checkpoint()
    if previous is None:
        return False, None
    with previous.as_directory() as folder:
        if (Path(folder) / META_FILE).is_file():
            return True, None
        return False, torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def sync_student_batchnorm(model: STFPM, device: torch.device) -> STFPM:
    """On GPUs, the student's BatchNorm layers normalise with the statistics of the whole group's batch.

    Data-parallel workers each see ``batch_size / workers`` images (2 for the reverse recipe's 16 on eight
    GPUs), too few for a BatchNorm's batch statistics; synchronised BatchNorm computes them over every
    worker's images, as one process would. timm's conversion keeps its norm-and-activation layers whole
    (PyTorch's would drop their activation); the state dict keeps its keys, so checkpoints are unchanged.
    The teacher is frozen in eval mode and keeps its own. PyTorch's synchronised BatchNorm runs on GPUs only,
    so CPU (gloo) workers keep per-worker statistics.
    """
    if device.type == "cuda":
        model.student = convert_sync_batchnorm(model.student)
    return model


def _data_parallel(config: TrainConfig, device: torch.device) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """Ray Train's DDP wrapper around a student with synchronised BatchNorm, told whether this student kind
    has parameters without gradients (DDP looks for them every step only then)."""
    unused = student_kind(config.student).unused_parameters
    return lambda model: ray.train.torch.prepare_model(
        sync_student_batchnorm(model, device), parallel_strategy_kwargs={"find_unused_parameters": unused}
    )


def worker_loop(loop_config: dict[str, Any]) -> str | None:
    """The core fit recipe plus a report hook, resuming from the last reported checkpoint after a restart.

    ``loop_config``: ``root``, ``category`` and ``config`` (a TrainConfig, whose ``threads`` the fit runs on
    whatever CPUs the worker reserved). Returns why the category cannot be trained (bad data or teacher
    weights), None after training.
    """
    config: TrainConfig = loop_config["config"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    finished, state = _previous_state()
    if finished:
        return None  # the final checkpoint was reported before the restart: nothing left to do
    reporter = _Reporter(device, None if state is None else state["fitter"]["epoch"])
    try:
        model, meta, fitter = fit_category(
            loop_config["root"],
            loop_config["category"],
            config,
            device=device,
            on_epoch=reporter,
            rank=rank,
            world_size=world_size,
            wrap_model=_data_parallel(config, device) if world_size > 1 else None,
            resume=state,
            extra_meta={"workers": world_size},
        )
    except (DatasetError, WeightsError) as exc:
        # Bad data fails the same way on every retry: return it instead of raising into FailureConfig.
        return f"{type(exc).__name__}: {exc}"
    final = {
        "final": True,
        "epoch": fitter.epoch,
        "epochs": config.epochs,
        "best_epoch": fitter.best_epoch,
        "best_val_loss": fitter.best_val_loss,
        "threshold": meta.threshold,
        **reporter.take_extras(fitter),
        "finished_at": time.time(),
    }
    _report_checkpoint(final, lambda folder: save_checkpoint(folder, model.student, meta, model.memory_bank))
    return None
