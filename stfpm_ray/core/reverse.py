"""The reverse student: a decoder that rebuilds the teacher's levels from one compact embedding of them.

Reverse distillation (Deng & Li, CVPR 2022, arXiv 2201.10703) keeps STFPM's frozen teacher, distance and
anomaly map, and changes what the student sees. A mirror student reads the image, so it can learn to copy
whatever the image shows, defects and exposure drifts included once it generalises well. The reverse student
reads the teacher's own features squeezed through a one-class bottleneck (all levels fused into one map at
half the coarsest level's resolution), so what it can rebuild is what defect-free images share; a defect,
squeezed out by the bottleneck, comes back wrong.

The layout follows the teacher's levels: each level must have twice the stride of the one before
(EfficientNet and ResNet levels 1-3: strides 4, 8, 16). It decodes features, not pixels, and the teacher's
features of a training image are computed once, so an epoch costs about half a mirror student's on CPUs
(docs/results-history.md: the student comparison).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stfpm_ray.errors import UserError

# Width of the bottleneck embedding and of the decoder stage that rebuilds each level (coarsest first).
EMBEDDING_CHANNELS = 256
SQUEEZED_CHANNELS = 128
DECODER_CHANNELS = (192, 96, 48, 24)


def _conv(inputs: int, outputs: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)
    )


def _upsample(inputs: int, outputs: int) -> nn.Sequential:
    """Twice the resolution, then two convolutions to rebuild the detail of that level."""
    return nn.Sequential(
        nn.ConvTranspose2d(inputs, outputs, 2, 2, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
        _conv(outputs, outputs),
        _conv(outputs, outputs),
    )


def _squeeze(inputs: int, halvings: int) -> nn.Sequential:
    """``halvings`` stride-2 convolutions, widening to SQUEEZED_CHANNELS by doubling towards the last."""
    widths = [inputs] + [SQUEEZED_CHANNELS // 2 ** (halvings - 1 - step) for step in range(halvings)]
    return nn.Sequential(*(_conv(widths[step], widths[step + 1], 2) for step in range(halvings)))


def check_strides(strides: Sequence[int]) -> None:
    """The bottleneck and decoder step by factors of two between levels: refuse any other pyramid."""
    if len(strides) > len(DECODER_CHANNELS) or any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise UserError(
            f"the reverse student needs at most {len(DECODER_CHANNELS)} teacher levels, each at twice the "
            f"stride of the one before; these layers have strides {list(strides)}"
        )


class ReverseStudent(nn.Module):
    """Teacher features (finest level first) in, the same levels rebuilt out."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        check_strides(strides)
        levels = len(channels)
        # one branch per finer level brings it down to the coarsest level's resolution, widening to 128
        self.squeeze = nn.ModuleList(_squeeze(channels[i], levels - 1 - i) for i in range(levels - 1))
        fused = SQUEEZED_CHANNELS * (levels - 1) + channels[-1]
        self.bottleneck = nn.Sequential(
            _conv(fused, EMBEDDING_CHANNELS, 2), _conv(EMBEDDING_CHANNELS, EMBEDDING_CHANNELS)
        )
        widths = (EMBEDDING_CHANNELS, *DECODER_CHANNELS[:levels])
        self.decode = nn.ModuleList(_upsample(widths[i], widths[i + 1]) for i in range(levels))
        self.heads = nn.ModuleList(nn.Conv2d(widths[i + 1], channels[levels - 1 - i], 1) for i in range(levels))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        *finer, coarsest = features
        x = self.bottleneck(torch.cat([branch(f) for branch, f in zip(self.squeeze, finer)] + [coarsest], dim=1))
        rebuilt = []
        for stage, head in zip(self.decode, self.heads):
            x = stage(x)
            rebuilt.append(head(x))
        return rebuilt[::-1]
