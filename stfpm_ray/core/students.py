"""The students: each kind is one registry entry, and nothing outside this module names one.

A student learns, on defect-free images, to reproduce the frozen teacher's feature levels; where it fails
on a new image is the anomaly map. Kinds differ in what they read and how they are trained, never in the
teacher, the distance or the map:

* ``reverse`` (default): a decoder that rebuilds the teacher's levels from a one-class bottleneck of them
  (reverse distillation, :mod:`stfpm_ray.core.reverse`), trained with Adam as in its paper. It reads
  features, not the image, so it cannot learn to follow what the image shows (exposure drift included);
  on MVTec AD screw it reaches the paper's STFPM row where the mirror student stays near 0.6 image AUROC
  (docs/results-history.md: the student comparison).
* ``mirror``: the teacher's own architecture, randomly initialised, reading the image: STFPM as published
  (Wang et al. 2021), with the official code's recipe (SGD lr 0.4, momentum 0.9, weight decay 1e-4,
  batch 32) at 50 epochs, where it already reaches the paper's bottle figures.

Adding a kind means adding one :class:`StudentKind` to :data:`STUDENTS`: the CLI's ``--student`` choices and
help, the training recipe, the optimiser, data-parallel settings and the checkpoint's expected tensor
shapes all come from the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cache
from types import MappingProxyType

import torch
from torch import nn

from stfpm_ray.core.memory_bank import DEFAULT_BANK_SIZE
from stfpm_ray.core.reverse import ReverseStudent
from stfpm_ray.core.teacher import create_features, pyramid_shape
from stfpm_ray.errors import UserError

# Checkpoints written before the field ``student`` existed hold a mirror student.
LEGACY_STUDENT = "mirror"
DEFAULT_STUDENT = "reverse"
# The reverse distillation paper's Adam betas.
REVERSE_BETAS = (0.5, 0.999)


@dataclass(frozen=True)
class Recipe:
    """A kind's training defaults, for the settings a run leaves unset."""

    epochs: int
    batch_size: int
    lr: float


# The training settings a recipe fills in (TrainConfig fields of the same names).
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))


@dataclass(frozen=True)
class OptimizerSettings:
    """What an optimiser factory may use; each kind takes the fields its recipe needs."""

    lr: float
    momentum: float
    weight_decay: float


@dataclass(frozen=True)
class StudentKind:
    """One kind of student.

    ``build(backbone, layers)`` makes a randomly initialised student for a teacher; ``reads_features``
    says whether it reads the teacher's features (else the normalised image). ``unused_parameters`` is
    True when some of its parameters get no gradient (DistributedDataParallel must then look for them
    every step, which costs time, so it is only asked where needed). ``smooths_maps``: whether its anomaly
    maps are smoothed before their maximum by default (:func:`stfpm_ray.core.anomaly_map.smooth_maps`).
    ``memory_bank``: the default size of the memory of good features scored beside it
    (:mod:`stfpm_ray.core.memory_bank`), 0 for none.
    """

    name: str
    help: str
    build: Callable[[str, tuple[int, ...]], nn.Module]
    reads_features: bool
    recipe: Recipe
    optimizer: Callable[[Iterable[nn.Parameter], OptimizerSettings], torch.optim.Optimizer]
    unused_parameters: bool
    smooths_maps: bool = False
    memory_bank: int = 0


def _mirror(backbone: str, layers: tuple[int, ...]) -> nn.Module:
    return create_features(backbone, layers)


def _reverse(backbone: str, layers: tuple[int, ...]) -> nn.Module:
    channels, strides = pyramid_shape(backbone, layers)
    return ReverseStudent(channels, strides)


def _sgd(parameters: Iterable[nn.Parameter], settings: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def _adam(parameters: Iterable[nn.Parameter], settings: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=settings.lr, betas=REVERSE_BETAS)


# The registry, default first (the order the CLI lists them in).
STUDENTS: dict[str, StudentKind] = {
    "reverse": StudentKind(
        name="reverse",
        help="a decoder reading the teacher's features through a bottleneck (reverse distillation; Adam)",
        build=_reverse,
        reads_features=True,
        # 200 epochs as reverse distillation trains: at 100, screw's best epochs were 96-100 (still learning);
        # 200 reached 0.958 against 0.946 with the same seed (README: what the defaults were chosen from)
        recipe=Recipe(epochs=200, batch_size=16, lr=0.005),
        optimizer=_adam,
        unused_parameters=False,
        smooths_maps=True,  # as reverse distillation does: image AUROC up on every shared real category
        # screw pixel AUROC 0.990 -> 0.993 over 3 seeds, elpv_mono image up (README: Results)
        memory_bank=DEFAULT_BANK_SIZE,
    ),
    "mirror": StudentKind(
        name="mirror",
        help="the teacher's architecture reading the image (STFPM as published; SGD)",
        build=_mirror,
        reads_features=False,
        recipe=Recipe(epochs=50, batch_size=32, lr=0.4),
        optimizer=_sgd,
        # a features-only EfficientNet keeps the blocks after the last tapped level: no gradient reaches them
        unused_parameters=True,
        # STFPM as published takes the raw map's maximum; smoothing measured 0.05-0.13 lower on screw
        smooths_maps=False,  # and no memory bank: the published method, to compare with its paper's rows
    ),
}


def student_kind(name: str) -> StudentKind:
    """The registry entry of ``name``; an unknown name is a :class:`UserError` listing the kinds."""
    try:
        return STUDENTS[name]
    except KeyError:
        raise UserError(f"student must be one of {', '.join(STUDENTS)}, got {name!r}") from None


def create_student(name: str, backbone: str, layers: Sequence[int]) -> nn.Module:
    """A randomly initialised student of kind ``name`` for the teacher ``backbone`` with ``layers``."""
    return student_kind(name).build(backbone, tuple(layers))


@cache
def state_shapes(name: str, backbone: str, layers: tuple[int, ...]) -> Mapping[str, tuple[int, ...]]:
    """Names and shapes of a student's state dict, built on the meta device: no memory, no weights.

    What a checkpoint's weights file must hold (:mod:`stfpm_ray.core.checkpoint`); cached because a scoring
    run validates every category's checkpoint and most share one kind and teacher.
    """
    with torch.device("meta"):
        student = create_student(name, backbone, layers)
    return MappingProxyType({key: tuple(t.shape) for key, t in student.state_dict().items()})
