"""The STFPM model: a frozen teacher, a student of the same architecture, loss and anomaly map.

Method (Wang et al. 2021, arXiv 2103.04257), as in the official code and anomalib:
per feature level, teacher and student features are L2-normalised along channels and compared with
``0.5 * ||t^ - s^||^2``; training averages that over positions and batch and sums over levels; the anomaly
map multiplies the levels' distance maps after bilinear upsampling to the input size, and the image score
is the map's maximum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stfpm_ray.core.inference_graph import optimize_for_inference
from stfpm_ray.core.teacher import Teacher, create_features


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` is bf16 on GPUs that support it and fp32 elsewhere.

    bf16 runs the networks' convolutions in bfloat16 (autocast) while distances and maps stay float32;
    scores move by about 1% (see README), which tensor-core GPUs repay several times over. CPUs with
    AVX512-BF16 or AMX are about 2x faster with it too, but CPU scoring stays exact unless asked.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    on_gpu = torch.device(device).type == "cuda"
    return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"


def feature_distance(teacher_feature: Tensor, student_feature: Tensor) -> Tensor:
    """Per-position distance ``0.5 * ||t^ - s^||^2`` of channel-normalised features, shape (N, H, W)."""
    diff = F.normalize(teacher_feature, dim=1) - F.normalize(student_feature, dim=1)
    return 0.5 * diff.pow(2).sum(dim=1)


def stfpm_loss(teacher_features: Sequence[Tensor], student_features: Sequence[Tensor]) -> Tensor:
    """Mean distance over batch and positions, summed over levels."""
    return sum(feature_distance(t, s).mean() for t, s in zip(teacher_features, student_features, strict=True))


def anomaly_map(
    teacher_features: Sequence[Tensor], student_features: Sequence[Tensor], size: tuple[int, int]
) -> Tensor:
    """Product over levels of the distance maps upsampled to ``size``, shape (N, H, W)."""
    result: Tensor | None = None
    for t, s in zip(teacher_features, student_features, strict=True):
        level = F.interpolate(
            feature_distance(t.float(), s.float()).unsqueeze(1), size=size, mode="bilinear", align_corners=False
        )
        result = level if result is None else result * level
    assert result is not None, "at least one feature level is needed"
    return result.squeeze(1)


def shrink_maps(maps: Tensor, size: int) -> Tensor:
    """Full-size maps (N, H, W) reduced to ``size`` x ``size`` for storage, by area averaging: every stored
    pixel is the mean of the pixels it covers, so a small defect keeps its mass instead of being skipped."""
    return F.interpolate(maps.unsqueeze(1), size=(size, size), mode="area").squeeze(1)


class STFPM(nn.Module):
    """Teacher and student feature pyramids behind one input normalisation.

    Inputs are uint8 (or float in 0..255) NCHW images, so that callers ship compact uint8 tensors and the
    teacher's own mean/std is applied in exactly one place for training and scoring alike.
    """

    def __init__(self, teacher: Teacher, backbone: str, layers: Sequence[int], seed: int = 0) -> None:
        super().__init__()
        self.teacher = teacher.network
        self.teacher.eval().requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.student = create_features(backbone, tuple(layers))
        # channels_last is the faster convolution layout on CPUs (oneDNN) and on tensor-core GPUs
        self.to(memory_format=torch.channels_last)
        scale = 255.0 * torch.tensor(teacher.std).view(1, 3, 1, 1)
        self.register_buffer("pixel_offset", 255.0 * torch.tensor(teacher.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_scale", scale, persistent=False)

    def train(self, mode: bool = True) -> "STFPM":
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
        return teacher_features, list(self.student(x))

    def for_inference(self) -> "STFPM":
        """Fold BatchNorm into convolutions and drop unused blocks, in teacher and student; scoring only.

        About 1.6x faster on CPU at the same scores (float rounding aside). The student cannot be trained
        afterwards. A teacher already rewritten (shared between the students of several categories) is
        kept as it is, so it stays shared.
        """
        self.eval()
        self.teacher = optimize_for_inference(self.teacher)
        self.student = optimize_for_inference(self.student)
        return self.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def predict(self, images: Tensor, precision: str = "fp32") -> tuple[Tensor, Tensor]:
        """Anomaly maps at the input size (N, H, W) and image scores (N,), float32.

        ``precision`` is ``fp32`` or ``bf16`` (see :func:`resolve_precision`).
        """
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"predict runs fp32 or bf16, got {precision!r} (resolve 'auto' first)")
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            teacher_features, student_features = self(images)
        maps = anomaly_map(teacher_features, student_features, tuple(images.shape[-2:]))
        return maps, maps.flatten(1).amax(dim=1)
