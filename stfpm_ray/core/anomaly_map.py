"""The STFPM anomaly map and image score: where teacher and student disagree, and how much.

Per feature level, teacher and student features are L2-normalised along channels and compared with
``0.5 * ||t^ - s^||^2`` (:func:`feature_distance`); the levels' distance maps are bilinearly upsampled to
the input size and combined (:func:`anomaly_map`), smoothed with a Gaussian (:func:`smooth_maps`), and the
image score is the map's maximum (:func:`image_scores`). Training (:func:`stfpm_ray.core.model.stfpm_loss`)
uses the same distance.

The reverse student's maps are smoothed as reverse distillation's are (Deng & Li 2022: sigma 4 at 256 px, here
``image_size / 64`` at any size; the mirror student, STFPM as published, keeps the raw map): an isolated hot
pixel of a good image, where one feature position happens to disagree, is spread out and loses to a defect,
which covers several positions. Measured on the shared real categories with today's checkpoints (256 px),
image AUROC rose from 0.912 to 0.929 on screw, 0.942 to 0.948 on elpv_mono and 0.998 to 1.000 on bottle
(README: Results). Checkpoints written before record no ``map_sigma`` and score unsmoothed.

Two combinations: ``product`` (the official code and anomalib) and ``sum``, the mean of the levels each divided
by its mean distance on the held-out good images (``level_scales``, measured after training). A raw product lets
the level with the widest spread on good images decide; calibrated levels weigh equally.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def feature_distance(teacher_feature: Tensor, student_feature: Tensor) -> Tensor:
    """Per-position distance ``0.5 * ||t^ - s^||^2`` of channel-normalised features, shape (N, H, W)."""
    diff = F.normalize(teacher_feature, dim=1) - F.normalize(student_feature, dim=1)
    return 0.5 * diff.pow(2).sum(dim=1)


COMBINATIONS = ("product", "sum")


def level_distances(teacher_features: Sequence[Tensor], student_features: Sequence[Tensor]) -> list[Tensor]:
    """Per-level distance maps at each level's own resolution, float32, each (N, h, w)."""
    return [feature_distance(t.float(), s.float()) for t, s in zip(teacher_features, student_features, strict=True)]


def anomaly_map(
    teacher_features: Sequence[Tensor],
    student_features: Sequence[Tensor],
    size: tuple[int, int],
    level_scales: Sequence[float] | None = None,
) -> Tensor:
    """Levels' distance maps upsampled to ``size`` and combined, shape (N, H, W).

    Without ``level_scales`` the product over levels; with them, the mean over levels of each map divided
    by its scale.
    """
    return combine_levels(level_distances(teacher_features, student_features), size, level_scales)


def combine_levels(
    distances: Sequence[Tensor], size: tuple[int, int], level_scales: Sequence[float] | None = None
) -> Tensor:
    """:func:`level_distances` upsampled to ``size`` and combined as :func:`anomaly_map` says; apart so that
    score-time variants can be compared on distances computed once (``benchmarks/score_ablation.py``)."""
    levels = [
        F.interpolate(level.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
        for level in distances
    ]
    if not levels:
        raise ValueError("at least one feature level is needed")
    if level_scales is None:
        result = levels[0]
        for level in levels[1:]:
            result = result * level
        return result
    if len(level_scales) != len(levels):
        raise ValueError(f"{len(level_scales)} level scales for {len(levels)} levels")
    return sum(level / scale for level, scale in zip(levels, level_scales)) / len(levels)


def default_map_sigma(image_size: int) -> float:
    """The smoothing of a model trained at ``image_size``: reverse distillation's sigma 4 at 256 px, to scale."""
    return image_size / 64


def smooth_maps(maps: Tensor, sigma: float) -> Tensor:
    """Maps (N, H, W) convolved with a Gaussian of ``sigma`` pixels (truncated at 4 sigma, edges reflected), as
    two 1-D passes; ``sigma`` 0 returns them unchanged."""
    if sigma <= 0:
        return maps
    radius = min(int(4 * sigma + 0.5), min(maps.shape[-2:]) - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.pad(maps.unsqueeze(1), (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1)).squeeze(1)


def stored_map_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(height, width) of the stored map of a (height, width) ``size`` map: its short side ``side``, aspect kept."""
    height, width = size
    scale = side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def shrink_maps(maps: Tensor, side: int) -> Tensor:
    """Full-size maps (N, H, W) reduced for storage to :func:`stored_map_size`, by area averaging: every stored
    pixel is the mean of the pixels it covers, so a small defect keeps its mass instead of being skipped."""
    size = stored_map_size(tuple(maps.shape[-2:]), side)
    return F.interpolate(maps.unsqueeze(1), size=size, mode="area").squeeze(1)


def image_scores(maps: Tensor) -> Tensor:
    """One score per map (N, H, W) -> (N,): its maximum."""
    return maps.flatten(1).amax(dim=1)
