"""Rewriting a frozen network into a faster one that computes the same outputs.

Scoring never trains, so two kinds of work in a timm ``features_only`` network are pure overhead there:

* **BatchNorm in eval mode** is a per-channel affine map right after a convolution; folding it into the
  convolution's weights and bias removes a full pass over every activation tensor (about a third of the
  CPU forward time of EfficientNet-Lite0 at 256 px).
* **Blocks after the last returned feature**: timm's EfficientNet/MobileNet feature networks keep every
  block and run them all, although STFPM's levels 1-3 need only the first five of seven.

Both rewrites are checked on a probe input against the original network; a network whose layout defeats
them (a normalisation that does not directly follow its convolution) is kept as it is, with a warning,
so the rewrite can only ever change speed, never scores beyond float rounding. The check runs in exact
float32 (:func:`exact_float32`): on Ampere and later GPUs convolutions default to TF32, whose rounding
(about 1e-3 relative) would exceed the tolerance and refuse every sound fold.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# Largest deviation of a rewritten network's features from the original, relative to their magnitude.
# Folding changes only the order of float32 operations (measured deviation about 2e-6).
TOLERANCE = 1e-4
_PROBE_SIZE = 96


def _activation_of(norm: nn.BatchNorm2d) -> nn.Module:
    """What a norm layer still applies once its affine part lives in the convolution.

    timm's ``BatchNormAct2d`` runs normalisation, dropout and activation in one module; the last two stay.
    """
    parts = [getattr(norm, name) for name in ("drop", "act") if isinstance(getattr(norm, name, None), nn.Module)]
    parts = [part for part in parts if not isinstance(part, nn.Identity)]
    return nn.Sequential(*parts) if parts else nn.Identity()


def fold_batchnorm(network: nn.Module) -> int:
    """Fold every eval-mode BatchNorm registered right after its convolution into it; returns the count.

    Relies on timm registering ``conv_x`` immediately before the norm that consumes its output, which
    :func:`optimize_for_inference` verifies numerically.
    """
    folded = 0
    for module in list(network.modules()):
        previous_name, previous = None, None
        for name, child in list(module.named_children()):
            is_norm = type(child) is nn.BatchNorm2d or _is_timm_norm_act(child)
            if (
                is_norm
                and isinstance(previous, nn.Conv2d)
                and previous.out_channels == child.num_features
                and child.track_running_stats
            ):
                setattr(module, previous_name, fuse_conv_bn_eval(previous, child))
                setattr(module, name, _activation_of(child))
                folded += 1
            previous_name, previous = name, child
    return folded


def _is_timm_norm_act(module: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` (a BatchNorm2d subclass that also applies dropout and activation)."""
    return isinstance(module, nn.BatchNorm2d) and type(module).__name__ == "BatchNormAct2d"


def drop_unused_blocks(network: nn.Module) -> int:
    """Cut a ``blocks`` sequence after the last block whose output is a returned feature; returns blocks cut."""
    feature_info = getattr(network, "feature_info", None)
    blocks = getattr(network, "blocks", None)
    if feature_info is None or not isinstance(blocks, nn.Sequential):
        return 0
    names = feature_info.module_name()
    if not all(name.startswith("blocks.") for name in names):
        return 0
    keep = max(int(name.split(".")[1]) for name in names) + 1
    cut = len(blocks) - keep
    if cut > 0:
        network.blocks = blocks[:keep]
    return max(cut, 0)


def image_probe(device: torch.device | str) -> torch.Tensor:
    """The input a rewritten image network is checked on."""
    probe = torch.rand(2, 3, _PROBE_SIZE, _PROBE_SIZE, generator=torch.Generator().manual_seed(0))
    return probe.to(device, memory_format=torch.channels_last)


def _tf32_switches() -> list[tuple[object, str, object]]:
    """(object, attribute, exact value) of the switches that let CUDA convolutions and matmuls use TF32.

    PyTorch 2.9 and later have per-backend ``fp32_precision`` settings and refuse to read the legacy
    ``allow_tf32`` flags once they are in use, so the new ones are used wherever they exist.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return [(conv, "fp32_precision", "ieee"), (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]


@contextmanager
def exact_float32() -> Iterator[None]:
    """float32 convolutions and matmuls without TF32 inside the block; the settings are restored after."""
    switches = _tf32_switches()
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in switches]
    try:
        for owner, name, exact in switches:
            setattr(owner, name, exact)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def optimize_for_inference(network: nn.Module, probe: object = None) -> nn.Module:
    """A faster eval-mode copy of a frozen network, or the network itself if a rewrite misbehaves.

    ``probe`` is what the network reads (default: an image batch, :func:`image_probe`); a network of
    features, such as the reverse student, is checked on features.
    """
    network.eval()
    rewritten = copy.deepcopy(network)
    if fold_batchnorm(rewritten) + drop_unused_blocks(rewritten) == 0:
        return network
    if probe is None:
        probe = image_probe(next(network.parameters()).device)
    with torch.inference_mode(), exact_float32():
        expected, got = network(probe), rewritten(probe)
    deviation = max(
        float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(expected, got, strict=True)
    )
    if deviation > TOLERANCE:
        warnings.warn(
            f"{type(network).__name__}: folding BatchNorm changed features by {deviation:.1e} (relative); "
            "scoring with the network as trained, which is slower",
            RuntimeWarning,
            stacklevel=2,
        )
        return network
    return rewritten.requires_grad_(False)
