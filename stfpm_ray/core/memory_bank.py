"""A memory of the teacher's features on good images: the nearest-neighbour opinion beside the student's.

The student says how far the teacher's features are from what it learnt to reproduce; the memory says how far
each position's teacher feature is from the nearest one seen on a good training image (PatchCore, Roth et al.
2022). They fail differently: the student generalises, so a defect that resembles good texture can slip
through, while the memory knows only what it kept, but localises sharply. Their normalised sum
(:meth:`stfpm_ray.core.model.STFPM.predict`) beat either alone on every shared real category (README: Results).

The memory holds the positions of the last two teacher levels (3x3 local means, the coarser level upsampled,
PatchCore's layer 2 + 3), thinned by a greedy k-centre coreset to ``size`` positions. The coreset keeps rare
good patterns (a random subset of the same size forgets them and flags them): with 3000 positions it scored
screw better than 30000 random ones at a tenth of the cost. A position's distance is the mean over its
``NEIGHBOURS`` nearest rows rather than to the nearest alone: one stray row near a defect can no longer hide it,
and which rows the coreset happened to keep matters less (screw's memory alone over three seeds: 0.911 to 0.932
image AUROC with the nearest, 0.924 to 0.935 with three; README: Results).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from stfpm_ray.core.teacher import pyramid_shape

DEFAULT_BANK_SIZE = 3000
MAX_BANK_SIZE = 50_000
# Nearest rows a position's distance is averaged over, for memories built from now on; checkpoints written
# before it record none and use the nearest alone.
NEIGHBOURS = 3
# Greedy coreset selection runs on a random projection to this many dimensions (PatchCore's speed-up) and on
# at most this many candidate positions (drawn at random), so that its cost is bounded for large categories.
PROJECTION_DIMS = 128
MAX_CANDIDATES = 2**18
# Bank rows compared at once: bounds the (positions x rows) distance matrix of a batch.
_BANK_CHUNK = 1024


def patch_features(teacher_features: Sequence[Tensor]) -> Tensor:
    """(N, C, h, w) float32 position features: the last two levels' 3x3 means at the finer one's resolution."""
    levels = [F.avg_pool2d(level.float(), 3, stride=1, padding=1) for level in teacher_features[-2:]]
    size = levels[0].shape[-2:]
    levels = [levels[0]] + [
        F.interpolate(level, size=size, mode="bilinear", align_corners=False) for level in levels[1:]
    ]
    return torch.cat(levels, dim=1)


def bank_channels(backbone: str, layers: Sequence[int]) -> int:
    """Channels of :func:`patch_features` for a teacher, without building its weights."""
    channels, _ = pyramid_shape(backbone, tuple(layers))
    return sum(channels[-2:])


def greedy_coreset(features: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Indices of ``size`` rows of ``features`` (M, C), each the farthest from those chosen before it.

    Every good pattern ends up within a small distance of a kept row, however rare it is.
    """
    if size >= len(features):
        return torch.arange(len(features))
    projection = torch.randn(features.shape[1], PROJECTION_DIMS, generator=generator) / PROJECTION_DIMS**0.5
    points = features @ projection.to(features.device)
    squared = points.pow(2).sum(dim=1)
    chosen = torch.empty(size, dtype=torch.long)
    index = int(torch.randint(len(points), (1,), generator=generator))
    nearest = torch.full_like(squared, float("inf"))
    for step in range(size):
        chosen[step] = index
        torch.minimum(nearest, squared - 2 * (points @ points[index]) + squared[index], out=nearest)
        index = int(nearest.argmax())
    return chosen


@torch.inference_mode()
def build_memory_bank(
    teacher_features: Callable[[Tensor], Sequence[Tensor]], images: Tensor, size: int, seed: int, batch_size: int
) -> Tensor:
    """(size, C) float32 memory of the good ``images`` (uint8 NCHW) as ``teacher_features`` sees them.

    Deterministic for a seed: the candidate draw and the coreset's start come from their own generator.
    """
    generator = torch.Generator().manual_seed(seed)
    candidates: list[Tensor] = []
    per_image: int | None = None
    for start in range(0, len(images), batch_size):
        patches = patch_features(teacher_features(images[start : start + batch_size])).cpu()
        rows = patches.permute(0, 2, 3, 1).reshape(len(patches), -1, patches.shape[1])
        if per_image is None:
            per_image = min(rows.shape[1], -(-MAX_CANDIDATES // len(images)))
        for image_rows in rows:
            keep = torch.randperm(len(image_rows), generator=generator)[:per_image]
            candidates.append(image_rows[keep])
    pool = torch.cat(candidates)
    return pool[greedy_coreset(pool, size, generator)].contiguous()


def nearest_distances(patches: Tensor, bank: Tensor, neighbours: int = 1) -> Tensor:
    """(N, h, w) mean Euclidean distance of each position of ``patches`` (N, C, h, w) to its ``neighbours``
    nearest bank rows (all rows, where the bank has fewer).

    The bank is walked in fixed chunks keeping a running k smallest, so memory stays bounded and the loop has
    the same length for any batch (an exported graph keeps a dynamic batch).
    """
    n, channels, height, width = patches.shape
    queries = patches.permute(0, 2, 3, 1).reshape(-1, channels)
    query_norms = queries.pow(2).sum(dim=1, keepdim=True)
    nearest: Tensor | None = None  # (positions, up to k) smallest squared distances so far
    for start in range(0, len(bank), _BANK_CHUNK):
        rows = bank[start : start + _BANK_CHUNK]
        squared = query_norms - 2 * queries @ rows.T + rows.pow(2).sum(dim=1)
        if nearest is not None:
            squared = torch.cat([nearest, squared], dim=1)
        nearest = squared.topk(min(neighbours, squared.shape[1]), dim=1, largest=False).values
    assert nearest is not None, "the memory bank is empty"
    return nearest.clamp_min(0).sqrt().mean(dim=1).view(n, height, width)
