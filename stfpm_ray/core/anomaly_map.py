"""The STFPM anomaly map and image score: where teacher and student disagree, and how much.

Per feature level, teacher and student features are L2-normalised along channels and compared with
``0.5 * ||t^ - s^||^2`` (:func:`feature_distance`); the map multiplies the levels' distance maps after
bilinear upsampling to the input size (:func:`anomaly_map`), and the image score is the map's maximum
(:func:`image_scores`). Training (:func:`stfpm_ray.core.model.stfpm_loss`) uses the same distance. This
module is the place to change how levels are combined or how an image is scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def feature_distance(teacher_feature: Tensor, student_feature: Tensor) -> Tensor:
    """Per-position distance ``0.5 * ||t^ - s^||^2`` of channel-normalised features, shape (N, H, W)."""
    diff = F.normalize(teacher_feature, dim=1) - F.normalize(student_feature, dim=1)
    return 0.5 * diff.pow(2).sum(dim=1)


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


def image_scores(maps: Tensor) -> Tensor:
    """One score per map (N, H, W) -> (N,): its maximum."""
    return maps.flatten(1).amax(dim=1)
