"""Training-time augmentation of defect-free images.

Archive photos drift in exposure and contrast (lamps age, cameras are swapped, the MVTec AD screw test
images are darker than its training images), and a student that only ever saw one exposure disagrees with
the teacher everywhere on a darker good image: the image score then measures lighting, not defects.
Photometric jitter shows the student the same part under other exposures. It is global per image, so it
never creates a local defect, and geometry is left alone (a rotated or flipped part can be a defect). It
also makes the student a better mimic of stains and discolourations, which then score lower: an option for
data with exposure drift, off by default (docs/results-history.md: levers measured on the mirror student).
"""

from __future__ import annotations

import torch
from torch import Tensor

AUGMENTATIONS = ("none", "photometric")


def photometric_jitter(images: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Per image, brightness and contrast each scaled by a factor drawn from ``[1 - strength, 1 + strength]``.

    ``images`` are NCHW in 0..255 (uint8 or float); the result is float in 0..255, which the model's input
    normalisation takes as it takes uint8.
    """
    n = len(images)
    low, high = 1.0 - strength, 1.0 + strength
    brightness = torch.empty(n, 1, 1, 1).uniform_(low, high, generator=generator).to(images.device)
    contrast = torch.empty(n, 1, 1, 1).uniform_(low, high, generator=generator).to(images.device)
    x = images.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * brightness).clamp_(0.0, 255.0)
