"""Fitting one student in plain PyTorch: data split, epochs, model selection, threshold.

:func:`fit_category` is the one recipe (seed, teacher, data, fitter, epochs, best epoch, calibration, meta);
the Ray Train worker (``stfpm_ray.ray.train_worker``) and the benchmarks call it with hooks, so a category trained
with or without Ray follows one code path. Model selection and the threshold use only the held-out
defect-free validation images, never test labels.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from stfpm_ray.core.anomaly_map import COMBINATIONS, default_map_sigma
from stfpm_ray.core.augment import AUGMENTATIONS, photometric_jitter
from stfpm_ray.core.calibration import CALIBRATED_PRECISION, calibration
from stfpm_ray.core.checkpoint import CheckpointMeta
from stfpm_ray.core.input_size import ASPECTS, category_aspect, input_size
from stfpm_ray.core.memory_bank import MAX_BANK_SIZE
from stfpm_ray.core.model import LOSSES, STFPM, stfpm_loss
from stfpm_ray.core.students import DEFAULT_STUDENT, RECIPE_FIELDS, OptimizerSettings, student_kind
from stfpm_ray.core.teacher import DEFAULT_LAYERS, OFFLINE_BACKBONE, Teacher, load_teacher
from stfpm_ray.data.images import ImageDecodeError, Size, load_image
from stfpm_ray.data.mvtec import DatasetError, train_images
from stfpm_ray.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters. ``epochs``, ``batch_size`` and ``lr`` left unset take the student kind's recipe
    (:mod:`stfpm_ray.core.students`, which also says why ``reverse`` is the default). The reverse student's
    validation loss still falls after 50 epochs, and screw's image AUROC with it, hence its 100.
    ``augment="photometric"`` adds brightness/contrast jitter (:mod:`stfpm_ray.core.augment`) for data whose
    exposure drifts between training and scoring; it is off by default because it costs detection on other
    data (docs/results-history.md: levers measured on the mirror student).
    ``target_far`` is the false-alarm rate on good images the threshold is calibrated for
    (:func:`stfpm_ray.core.calibration.calibration`).
    5%, from ``benchmarks/operating_point.py`` on the demo data (15 fits of 8 validation images, 360 good and
    540 defective test images): it let through 3.1% of good images, where the old validation maximum let
    through 7.5%, and kept 68% recall (maximum: 77%). Stricter targets pay for the few validation images
    (the t quantile) in recall: 2% gives 1.4% false alarms and 56% recall, 1% gives 0.6% and 47%, which on
    the quick-start demo leaves a category with image AUROC 1.000 detecting none of its defects. Missed
    defects usually cost more than a second look at a good part, so 5% is the default and ``--target-far``
    the lever; from about 20 validation images on, the validation maximum binds at 5% anyway.
    ``threads`` is the number of intra-op threads the training arithmetic runs on, whatever CPUs the worker
    reserved: oneDNN's convolutions and BatchNorm's batch statistics split their sums by thread count, so the
    same seed with 1 and 2 threads differs after one step (gradients up to 1.4% apart) and ends in another
    model (the threshold 1.6% apart after 8 epochs). Fixed in the recipe, a checkpoint follows from seed and
    recipe alone, not from how many categories shared the node. 2: on the 2-core machines measured one
    category with 2 threads trains as fast as two categories with 1 each; more pays off only for a single
    category on a large CPU node (``--threads``; GPU training does its arithmetic on the GPU either way).
    """

    backbone: str = OFFLINE_BACKBONE
    layers: tuple[int, ...] = DEFAULT_LAYERS
    weights: str = "auto"
    image_size: int = 256
    # keep: the short side is image_size, the long one follows the category's images; square: image_size x
    # image_size (core.input_size)
    aspect: str = "keep"
    # None: the student kind's recipe
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    augment: str = "none"
    augment_strength: float = 0.3
    combine: str = "product"
    loss: str = "position"
    # Gaussian smoothing of the anomaly map in pixels; None: the student kind's default (image_size / 64 where it
    # smooths, see core.anomaly_map), 0: none
    map_sigma: float | None = None
    # positions kept in the memory of good teacher features scored beside the student (core.memory_bank);
    # None: the student kind's default, 0: none
    memory_bank: int | None = None
    cache_teacher: bool = True
    target_far: float = 0.05
    student: str = DEFAULT_STUDENT
    threads: int = 2

    def __post_init__(self) -> None:
        self.layers = tuple(int(v) for v in self.layers)
        kind = student_kind(self.student)
        recipe = kind.recipe
        for name in RECIPE_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(recipe, name))
        if self.image_size < 32 or self.image_size % 32:
            raise UserError(f"image size must be a multiple of 32 and >= 32, got {self.image_size}")
        if self.aspect not in ASPECTS:
            raise UserError(f"aspect must be one of {', '.join(ASPECTS)}, got {self.aspect!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("epochs and batch size must be >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        if self.augment not in AUGMENTATIONS:
            raise UserError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if self.map_sigma is None:
            self.map_sigma = default_map_sigma(self.image_size) if kind.smooths_maps else 0.0
        if not 0.0 <= self.map_sigma <= self.image_size / 8:
            raise UserError(f"map sigma must be in [0, image size / 8], got {self.map_sigma}")
        if self.memory_bank is None:
            self.memory_bank = kind.memory_bank
        if not 0 <= self.memory_bank <= MAX_BANK_SIZE:
            raise UserError(f"memory bank size must be in [0, {MAX_BANK_SIZE}], got {self.memory_bank}")
        if self.loss not in LOSSES:
            raise UserError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.combine not in COMBINATIONS:
            raise UserError(f"combine must be one of {', '.join(COMBINATIONS)}, got {self.combine!r}")
        if not 0.0 <= self.augment_strength < 1.0:
            raise UserError(f"augment strength must be in [0, 1), got {self.augment_strength}")
        if self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")
        if not 0.0 < self.target_far < 0.5:
            raise UserError(f"target false-alarm rate must be in (0, 0.5), got {self.target_far}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_train_val(paths: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded hold-out of ``val_fraction`` of the training images (at least one each side)."""
    if len(paths) < 2:
        raise DatasetError(f"need at least 2 training images to hold out validation, got {len(paths)}")
    order = np.random.default_rng(seed).permutation(len(paths))
    n_val = min(max(1, int(round(len(paths) * val_fraction))), len(paths) - 1)
    val = sorted(paths[i] for i in order[:n_val])
    train = sorted(paths[i] for i in order[n_val:])
    return train, val


def load_images(paths: Sequence[str | Path], size: Size) -> tuple[Tensor, list[str]]:
    """Decode to one uint8 NCHW tensor; unreadable files are skipped and returned as messages."""
    arrays, problems = [], []
    for path in paths:
        try:
            arrays.append(load_image(path, size))
        except ImageDecodeError as exc:
            problems.append(f"{path}: {exc}")
    if not arrays:
        raise DatasetError(f"none of {len(paths)} images could be read; first problem: {problems[:1]}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), problems


def rank_batches(order: Tensor, rank: int, world_size: int, batch_size: int) -> list[Tensor]:
    """This rank's batches of an epoch's shuffled ``order``: the same number of steps on every rank.

    Data-parallel steps are collective (DDP all-reduces the gradients of each step), so a rank with one step
    more than the others waits in an all-reduce nobody else joins and the group hangs until its timeout.
    The order is padded by wrapping to a multiple of ``world_size`` before it is strided by rank, as
    torch's ``DistributedSampler`` does: every rank then holds the same number of images and, split into
    ``batch_size // world_size`` chunks, the same number of steps. Padding repeats at most
    ``world_size - 1`` images of the epoch where dropping the remainder would skip as many; padding was
    chosen because it leaves a single worker's order exactly as it was (nothing to pad), so single-worker
    fits, and the figures measured with them, are unchanged.
    """
    padded = -len(order) % world_size
    if padded:
        order = torch.cat([order, order.repeat(padded // len(order) + 1)[:padded]])
    per_worker = max(1, batch_size // world_size)
    return list(order[rank::world_size].split(per_worker))


class StudentFitter:
    """Epoch loop over in-memory uint8 images, optionally data-parallel.

    ``model`` may be a DistributedDataParallel wrapper of :class:`STFPM`; ``rank``/``world_size`` select
    this worker's share of each epoch's shuffled order (:func:`rank_batches`: the same number of steps on
    every rank), so all workers together see every image once. Validation runs the unwrapped model on every
    rank, with no collective, so the ranks' epochs stay in step whatever the validation set's size.
    Without augmentation the teacher's features of an image never change, so with ``cache_teacher`` they
    are computed once and reused every epoch, which removes the teacher forward from the training loop.
    Augmentation draws from a generator seeded by seed, epoch and rank, so a fit is repeatable.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train: Tensor,
        val: Tensor,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.model = model
        self.core: STFPM = getattr(model, "module", model)
        self.config = config
        self.device = torch.device(device)
        self.train_images, self.val_images = train, val
        self.rank, self.world_size = rank, world_size
        settings = OptimizerSettings(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        self.optimizer = student_kind(config.student).optimizer(self.core.student.parameters(), settings)
        self.epoch = 0
        self.best_val_loss = float("inf")
        self.best_epoch = -1
        self.best_state: dict[str, Tensor] | None = None
        self._teacher_cache: list[Tensor] | None = None
        self.started_at = time.time()

    @property
    def augments(self) -> bool:
        return self.config.augment != "none" and self.config.augment_strength > 0

    def _teacher_features(self, index: Tensor) -> list[Tensor] | None:
        if not self.config.cache_teacher or self.augments:
            return None
        if self._teacher_cache is None:
            chunks = [
                self.core.teacher_features(self.train_images[i : i + 64].to(self.device))
                for i in range(0, len(self.train_images), 64)
            ]
            self._teacher_cache = [torch.cat(level) for level in zip(*chunks)]
        return [level[index.to(level.device)] for level in self._teacher_cache]

    def _batches(self) -> list[Tensor]:
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.train_images), generator=generator)
        return rank_batches(order, self.rank, self.world_size, self.config.batch_size)

    def train_epoch(self) -> dict[str, float]:
        """One pass over this worker's share; returns mean loss and images per second."""
        self.model.train()
        started, total, seen = time.perf_counter(), 0.0, 0
        generator = torch.Generator().manual_seed((self.config.seed * 100_003 + self.epoch) * 1_009 + self.rank)
        for index in self._batches():
            images = self.train_images[index].to(self.device, non_blocking=True)
            if self.augments:
                images = photometric_jitter(images, self.config.augment_strength, generator)
            teacher_features, student_features = self.model(images, teacher_features=self._teacher_features(index))
            loss = stfpm_loss(teacher_features, student_features, self.config.loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach()) * len(index)
            seen += len(index)
        self.epoch += 1
        elapsed = time.perf_counter() - started
        return {"train_loss": total / max(seen, 1), "images_per_s": seen / elapsed if elapsed > 0 else 0.0}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss; remembers the student of the best epoch so far."""
        self.core.eval()
        total = 0.0
        for i in range(0, len(self.val_images), self.config.batch_size):
            images = self.val_images[i : i + self.config.batch_size].to(self.device)
            total += float(stfpm_loss(*self.core(images), self.config.loss)) * len(images)
        val_loss = total / len(self.val_images)
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch = val_loss, self.epoch
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.core.student.state_dict().items()})
        return {"val_loss": val_loss, "best_val_loss": self.best_val_loss, "best_epoch": self.best_epoch}

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.core.student.load_state_dict(self.best_state)
        self.core.eval()

    def state_dict(self) -> dict:
        """Everything needed to resume after a crash (used by Ray Train checkpoints)."""
        return {
            "student": self.core.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.core.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = state["epoch"]
        self.best_val_loss = state["best_val_loss"]
        self.best_epoch = state["best_epoch"]
        self.best_state = state["best_state"]


def validation_scores(model: STFPM, images: Tensor, batch_size: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Image scores of held-out good images, the basis of threshold and normalisation, in the precision the
    checkpoint records for them (``CALIBRATED_PRECISION``, which ``--precision auto`` scores in)."""
    model.eval()
    scores = [
        model.predict(images[i : i + batch_size].to(device), CALIBRATED_PRECISION)[1].cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(scores).numpy().astype(np.float64)


def build_meta(
    category: str, config: TrainConfig, teacher: Teacher, fitter: StudentFitter, val_scores: np.ndarray, extra: dict
) -> CheckpointMeta:
    threshold, stats, record = calibration(val_scores, config.target_far, CALIBRATED_PRECISION)
    height, width = fitter.train_images.shape[-2:]
    training = {
        **{k: v for k, v in asdict(config).items() if k not in ("backbone", "layers", "weights", "image_size")},
        "best_epoch": fitter.best_epoch,
        "best_val_loss": fitter.best_val_loss,
        "train_images": len(fitter.train_images),
        "val_images": len(fitter.val_images),
        **extra,
    }
    return CheckpointMeta(
        category=category,
        backbone=config.backbone,
        layers=list(config.layers),
        image_size=config.image_size,
        input_shape=None if height == width else [height, width],
        teacher_source=teacher.source,
        teacher_sha256=teacher.sha256,
        threshold=threshold,
        normalization=stats,
        training=training,
        calibration=record,
        combine=config.combine,
        map_sigma=float(config.map_sigma),
        student=config.student,
        level_scales=list(fitter.core.level_scales) if fitter.core.level_scales is not None else None,
        # the rows kept: fewer than asked where the training images have fewer positions
        memory_bank=0 if fitter.core.memory_bank is None else len(fitter.core.memory_bank),
        memory_neighbours=fitter.core.memory_neighbours,
        map_scales=list(fitter.core.map_scales) if fitter.core.map_scales is not None else None,
    )


def prepare_category(root: str | Path, category: str, config: TrainConfig) -> tuple[Tensor, Tensor, list[str]]:
    """Split and decode a category's training images into train and validation tensors, at the input size the
    config asks for (:mod:`stfpm_ray.core.input_size`)."""
    paths = train_images(root, category)
    train_paths, val_paths = split_train_val(paths, config.val_fraction, config.seed)
    aspect = category_aspect(paths) if config.aspect == "keep" else 1.0
    size = input_size(config.image_size, aspect)
    train, bad_train = load_images(train_paths, size)
    val, bad_val = load_images(val_paths, size)
    return train, val, bad_train + bad_val


@contextlib.contextmanager
def recipe_arithmetic(threads: int, device: torch.device) -> Iterator[None]:
    """Run the training arithmetic as the recipe says, whatever the process was set to before: ``threads``
    intra-op threads (TrainConfig) and, on a GPU, cuDNN's deterministic algorithms without autotuning (which
    picks kernels by timing, so by load). Restored afterwards: a driver that trains in-process keeps its own."""
    before = torch.get_num_threads()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


class FitResult(NamedTuple):
    """A trained category: the best-epoch model (eval mode), its checkpoint metadata, and the fitter."""

    model: STFPM
    meta: CheckpointMeta
    fitter: StudentFitter


EpochHook = Callable[[StudentFitter, dict], None]


def fit_category(
    root: str | Path,
    category: str,
    config: TrainConfig,
    teacher: Teacher | None = None,
    device: str | torch.device = "cpu",
    on_epoch: EpochHook | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    resume: dict | None = None,
    extra_meta: dict | None = None,
) -> FitResult:
    """The one recipe for fitting a category: seed, teacher, data, fitter, epochs, best epoch, calibration, meta.

    ``on_epoch(fitter, metrics)`` runs after every epoch (the Ray Train worker reports from it);
    ``wrap_model`` wraps the model for data-parallel training; ``resume`` is a state written by
    :func:`resume_state`, from which the epochs continue. Raises :class:`DatasetError` or ``WeightsError``
    before training starts when the data or the teacher cannot be had.
    """
    with recipe_arithmetic(config.threads, torch.device(device)):
        seed_everything(config.seed)
        train, val, problems = prepare_category(root, category, config)
        teacher = teacher or load_teacher(config.backbone, config.layers, config.weights)
        for problem in problems:
            log.warning("skipped unreadable training image %s", problem)
        model: nn.Module = STFPM(teacher, config.backbone, config.layers, seed=config.seed, student=config.student)
        model = model.to(device)
        if wrap_model is not None:
            model = wrap_model(model)
        fitter = StudentFitter(model, config, train, val, device=device, rank=rank, world_size=world_size)
        started_at = time.time()
        if resume is not None:
            fitter.load_state_dict(resume["fitter"])
            started_at = resume["started_at"]
        fitter.started_at = started_at
        shape = tuple(train.shape[-2:])  # (height, width), a tuple as history is; the driver prints it once
        while fitter.epoch < config.epochs:
            metrics: dict = {"category": category, **fitter.train_epoch(), **fitter.validate()}
            # Each worker saw 1/world_size of the epoch in the same time: the group's rate is world_size times.
            metrics.update(epoch=fitter.epoch, epochs=config.epochs, images_per_s=metrics["images_per_s"] * world_size)
            metrics["input_size"] = shape
            if on_epoch:
                on_epoch(fitter, metrics)
        fitter.restore_best()
        fitter.core.map_sigma = float(config.map_sigma)
        if config.combine == "sum":
            fitter.core.level_scales = fitter.core.mean_level_distances(val, config.batch_size)
        if config.memory_bank:
            fitter.core.add_memory(train, val, config.memory_bank, config.seed, config.batch_size)
        scores = validation_scores(fitter.core, val, config.batch_size, device)
        extra = {"seconds": time.time() - started_at, "skipped_images": problems, **(extra_meta or {})}
        return FitResult(fitter.core, build_meta(category, config, teacher, fitter, scores, extra), fitter)


def resume_state(fitter: StudentFitter) -> dict:
    """What :func:`fit_category` needs to continue after a crash (the fitter's state and its start time)."""
    return {"fitter": fitter.state_dict(), "started_at": fitter.started_at}
