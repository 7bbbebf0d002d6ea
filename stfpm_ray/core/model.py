"""The model: a frozen teacher and a student behind one input normalisation, the loss, and prediction.

Method (STFPM, Wang et al. 2021, arXiv 2103.04257, as in the official code and anomalib): the student learns
to reproduce the teacher's feature levels on defect-free images; training averages the per-position feature
distance over positions and batch and sums it over levels. Which student, and what it reads, comes from
its kind (:mod:`stfpm_ray.core.students`); the anomaly map and image score live in
:mod:`stfpm_ray.core.anomaly_map`. A model may also carry a memory of the teacher's features on good images
(:mod:`stfpm_ray.core.memory_bank`), whose nearest-neighbour map is averaged with the student's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stfpm_ray.core.anomaly_map import anomaly_map, feature_distance, image_scores, level_distances, smooth_maps
from stfpm_ray.core.calibration import CALIBRATED_PRECISION
from stfpm_ray.core.inference_graph import image_probe, optimize_for_inference
from stfpm_ray.core.memory_bank import NEIGHBOURS, build_memory_bank, nearest_distances, patch_features
from stfpm_ray.core.students import DEFAULT_STUDENT, create_student, student_kind
from stfpm_ray.core.teacher import Teacher
from stfpm_ray.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` runs bf16 convolutions natively: CUDA compute capability 8.0 (Ampere) or later.

    ``torch.cuda.is_bf16_supported()`` also says yes to older cards, which emulate bf16 and run it slower
    than fp32.
    """
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision: str, device: str | torch.device, calibrated: str = CALIBRATED_PRECISION) -> str:
    """``auto`` is the precision the operating point was ``calibrated`` in where ``device`` runs it natively,
    else fp32; ``fp32`` and ``bf16`` are taken as asked.

    bf16 runs the networks' convolutions in bfloat16 (autocast) while distances and maps stay float32; it
    moves scores by up to several percent (README: speed, the model-only row), so a threshold set on fp32
    scores decides bf16 scores differently near it: ``auto`` scores as the threshold was calibrated, and a
    run that asks for bf16 anyway trades that for speed (the run's start line says so).
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if calibrated == "bf16" and native_bf16(device) else "fp32"


def describe_precision(precision: str, calibrated: Iterable[str]) -> str:
    """A run's precision in words for its start line: what ``auto`` follows, or what an explicit choice
    departs from."""
    kinds = ", ".join(sorted(set(calibrated))) or CALIBRATED_PRECISION
    if precision == "auto":
        return f"precision auto (as the thresholds were calibrated: {kinds})"
    if kinds != precision:
        return f"precision {precision} (note: thresholds calibrated in {kinds}, decisions near them may differ)"
    return f"precision {precision}"


# ``position``: the map's own distance averaged over positions (every position counts alike); ``flat``: reverse
# distillation's 1 - cosine of each level's whole flattened map per image (positions count by feature norm);
# ``hard``: the mean over the batch's hardest positions of each level, those at or above its HARD_QUANTILE of the
# distance (EfficientAD's hard-feature loss, Batzner et al. 2024: the student stops spending its capacity on what it
# already reproduces). EfficientAD takes the 0.999 quantile of single channel elements; a position here holds
# every channel, and 0.999 of a 16-image batch would train the coarsest level on 4 positions, hence 0.99.
LOSSES = ("position", "flat", "hard")
HARD_QUANTILE = 0.99


def stfpm_loss(
    teacher_features: Sequence[Tensor], student_features: Sequence[Tensor], loss: str = "position"
) -> Tensor:
    """Per-image loss averaged over the batch and summed over levels, as :data:`LOSSES` says."""
    pairs = zip(teacher_features, student_features, strict=True)
    if loss == "flat":
        return sum((1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean() for t, s in pairs)
    if loss == "hard":
        return sum(_hardest(feature_distance(t, s)).mean() for t, s in pairs)
    return sum(feature_distance(t, s).mean() for t, s in pairs)


def _hardest(distances: Tensor) -> Tensor:
    """The distances at or above their :data:`HARD_QUANTILE` (the cut itself carries no gradient)."""
    cut = torch.quantile(distances.detach().flatten().float(), HARD_QUANTILE)
    return distances[distances >= cut]


class STFPM(nn.Module):
    """Teacher and student feature pyramids behind one input normalisation.

    Inputs are uint8 (or float in 0..255) NCHW images, so that callers ship compact uint8 tensors and the
    teacher's own mean/std is applied in exactly one place for training and scoring alike. ``student`` names
    a kind of :data:`stfpm_ray.core.students.STUDENTS`; loss and map are the same for every kind.
    """

    runtime = "torch"  # what a scores row records as having run the networks (stfpm_ray.core.runtimes)

    def __init__(
        self, teacher: Teacher, backbone: str, layers: Sequence[int], seed: int = 0, student: str = DEFAULT_STUDENT
    ) -> None:
        super().__init__()
        self.teacher = teacher.network
        self.teacher.eval().requires_grad_(False)
        self.student_kind = student
        self.reads_features = student_kind(student).reads_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.student = create_student(student, backbone, layers)
        # channels_last is the faster convolution layout on CPUs (oneDNN) and on tensor-core GPUs
        self.to(memory_format=torch.channels_last)
        scale = 255.0 * torch.tensor(teacher.std).view(1, 3, 1, 1)
        self.register_buffer("pixel_offset", 255.0 * torch.tensor(teacher.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_scale", scale, persistent=False)
        # None: the product of levels; else the calibrated sum (see stfpm_ray.core.anomaly_map)
        self.level_scales: tuple[float, ...] | None = None
        # Gaussian smoothing of the map in pixels, 0 for none (checkpoints written before it existed)
        self.map_sigma = 0.0
        # The teacher's features of good images (stfpm_ray.core.memory_bank), the nearest rows a position's
        # distance averages, and what the student's map and the memory's are divided by before they are
        # averaged (opinion_scales): None, the student's map alone.
        self.register_buffer("memory_bank", None, persistent=False)
        self.memory_neighbours = 1
        self.map_scales: tuple[float, float] | None = None

    def train(self, mode: bool = True) -> STFPM:
        """Switch the student only: the teacher's BatchNorm statistics must never move."""
        super().train(mode)
        self.teacher.eval()
        return self

    def normalize(self, images: Tensor) -> Tensor:
        x = (images.float() - self.pixel_offset) / self.pixel_scale
        return x.contiguous(memory_format=torch.channels_last)

    def teacher_features(self, images: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return list(self.teacher(self.normalize(images)))

    def forward(
        self, images: Tensor, teacher_features: list[Tensor] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Teacher and student features of a uint8 NCHW batch.

        ``teacher_features`` passes features computed earlier for the same images (the teacher is frozen,
        so they never change), which skips the teacher forward during training.
        """
        x = self.normalize(images)
        if teacher_features is None:
            with torch.no_grad():
                teacher_features = list(self.teacher(x))
        student_input = teacher_features if self.reads_features else x
        return teacher_features, list(self.student(student_input))

    def for_inference(self) -> STFPM:
        """Fold BatchNorm into convolutions and drop unused blocks, in teacher and student; scoring only.

        Same scores up to float rounding, faster (README: speed). The student cannot be trained
        afterwards. A teacher already rewritten (shared between the students of several categories) is
        kept as it is, so it stays shared.
        """
        self.eval()
        self.teacher = optimize_for_inference(self.teacher)
        probe = image_probe(self.pixel_offset.device)
        if self.reads_features:  # checked on what it reads: the teacher's features of the probe
            with torch.inference_mode():
                probe = list(self.teacher(probe))
        self.student = optimize_for_inference(self.student, probe)
        return self.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def predict(self, images: Tensor, precision: str = "fp32") -> tuple[Tensor, Tensor]:
        """Anomaly maps at the input size (N, H, W) and image scores (N,), float32.

        ``precision`` is ``fp32`` or ``bf16`` (see :func:`resolve_precision`).
        """
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"predict runs fp32 or bf16, got {precision!r} (resolve 'auto' first)")
        maps = self.opinion_maps(images, precision)
        if len(maps) == 1:
            combined = maps[0]
        else:
            if self.map_scales is None:
                raise RuntimeError("a model with a memory bank needs its map scales (set by training)")
            combined = sum(m / scale for m, scale in zip(maps, self.map_scales, strict=True)) / len(maps)
        return combined, image_scores(combined)

    @torch.inference_mode()
    def opinion_maps(self, images: Tensor, precision: str = "fp32") -> list[Tensor]:
        """The smoothed maps (N, H, W) that :meth:`predict` combines: the student's, then the memory's if any.

        The memory's distances are computed in float32 whatever ``precision``: they are differences of large
        squared norms, which bf16 would round away.
        """
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            teacher_features, student_features = self(images)
        size = tuple(images.shape[-2:])
        maps = [anomaly_map(teacher_features, student_features, size, self.level_scales)]
        if self.memory_bank is not None:
            distances = nearest_distances(patch_features(teacher_features), self.memory_bank, self.memory_neighbours)
            maps.append(F.interpolate(distances.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0])
        return [smooth_maps(m, self.map_sigma) for m in maps]

    def add_memory(self, train: Tensor, val: Tensor, size: int, seed: int, batch_size: int) -> None:
        """Keep a memory of ``size`` positions of the good ``train`` images and scale both opinions on the held-out
        good ``val`` images (uint8 NCHW). After training: the scales depend on the student's final weights."""
        device = self.pixel_offset.device
        self.memory_bank = build_memory_bank(
            lambda batch: self.teacher_features(batch.to(device)), train, size, seed, batch_size
        ).to(device)
        self.memory_neighbours = NEIGHBOURS
        self.map_scales = self.opinion_scales(val, batch_size)

    @torch.inference_mode()
    def opinion_scales(self, images: Tensor, batch_size: int) -> tuple[float, ...]:
        """What each of :meth:`opinion_maps` is divided by before :meth:`predict` averages them: its mean image
        score (map maximum) over ``images``, held-out good ones, which puts both on one footing.

        Dividing by the spread of those scores instead weighs the memory more: higher image AUROC, lower pixel
        AUROC on bottle (README: Results), so the mean stays.
        """
        return self._means_over(
            images, batch_size, lambda batch: [float(image_scores(m).sum()) for m in self.opinion_maps(batch, "fp32")]
        )

    @torch.inference_mode()
    def mean_level_distances(self, images: Tensor, batch_size: int) -> tuple[float, ...]:
        """Mean distance of each level over ``images`` (held-out good ones): the scales of the calibrated sum."""
        return self._means_over(
            images,
            batch_size,
            lambda batch: [float(level.sum()) / level[0].numel() for level in level_distances(*self(batch))],
        )

    def _means_over(
        self, images: Tensor, batch_size: int, batch_sums: Callable[[Tensor], list[float]]
    ) -> tuple[float, ...]:
        """Per-image means over ``images``, taken in batches: ``batch_sums(batch)`` sums each quantity over a
        batch's images."""
        totals: list[float] = []
        for start in range(0, len(images), batch_size):
            sums = batch_sums(images[start : start + batch_size].to(self.pixel_offset.device))
            totals = sums if not totals else [a + b for a, b in zip(totals, sums)]
        return tuple(total / len(images) for total in totals)
