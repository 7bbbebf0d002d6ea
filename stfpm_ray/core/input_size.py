"""The network input size of a category: square, or its images' aspect ratio kept.

Squashing a 1:2.5 image into a square shrinks its long side 2.5 times more than its short one: a thin defect
along the long side can fall below one feature cell, and every shape the teacher sees is distorted from the
natural images it learnt on. With the aspect kept, the short side is ``--image-size`` and the long side
follows from the category's training images (their median height/width, a multiple of 32, the teachers'
largest stride, at most :data:`MAX_ASPECT` times the short side), as ``torchvision.transforms.Resize(int)``
does: square categories are unchanged, a tall one costs in proportion to its extra pixels. Images of one
category that differ from its median are resized to the category's size, as every image was before. A category
that mixes upright and lying images (a tenth of them taller than wide by 10% or more and a tenth wider) has no
shape to keep: it stays square, where neither kind is distorted more than the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from stfpm_ray.data.images import image_aspect

ASPECTS = ("keep", "square")
# A long side beyond 4x the short one (1024 px at 256) costs more memory than any inspection image needs.
MAX_ASPECT = 4.0
_STRIDE = 32
# Aspects within 10% of square count as neither upright nor lying when a category's orientations are judged.
_SQUARE_TOLERANCE = 1.1


def input_size(side: int, aspect: float) -> tuple[int, int]:
    """(height, width) for images of height/width ``aspect``: the short side ``side``, the long side rounded to a
    multiple of 32 and capped at :data:`MAX_ASPECT` times ``side``."""
    ratio = min(max(aspect, 1 / MAX_ASPECT), MAX_ASPECT)
    long_side = max(side, int(side * max(ratio, 1 / ratio) / _STRIDE + 0.5) * _STRIDE)  # half up
    return (long_side, side) if ratio >= 1 else (side, long_side)


def category_aspect(paths: Iterable[str | Path]) -> float:
    """The median height/width of the readable images among ``paths``; 1.0 if none is readable (decoding
    reports them) or if upright and lying images mix."""
    aspects = [aspect for aspect in map(image_aspect, paths) if aspect is not None]
    if not aspects:
        return 1.0
    low, high = np.percentile(aspects, [10, 90])
    if low <= 1 / _SQUARE_TOLERANCE and high >= _SQUARE_TOLERANCE:
        return 1.0
    return float(np.median(aspects))
