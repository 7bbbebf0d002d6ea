"""The inference rewrite (BatchNorm folding, unused blocks dropped) keeps scores and refuses what it cannot fold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stfpm_ray.core import inference_graph
from stfpm_ray.core.inference_graph import drop_unused_blocks, fold_batchnorm, optimize_for_inference
from stfpm_ray.core.model import STFPM
from stfpm_ray.core.teacher import DEFAULT_LAYERS, OFFLINE_BACKBONE, create_features, load_teacher


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(OFFLINE_BACKBONE, DEFAULT_LAYERS, "offline")


def test_efficientnet_loses_every_batchnorm_and_its_unused_blocks(teacher) -> None:
    network = create_features(OFFLINE_BACKBONE, DEFAULT_LAYERS)
    network.load_state_dict(teacher.network.state_dict())
    network.eval()
    assert fold_batchnorm(network) > 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    assert drop_unused_blocks(network) == 2  # levels 1-3 end at block 4 of 0-6
    assert drop_unused_blocks(network) == 0


def test_networks_without_a_block_sequence_keep_their_layout() -> None:
    network = create_features("resnet18", DEFAULT_LAYERS)
    assert drop_unused_blocks(network) == 0


@pytest.mark.parametrize("student", ["mirror", "reverse"])
def test_for_inference_keeps_maps_and_scores(teacher, student) -> None:
    model = STFPM(teacher, OFFLINE_BACKBONE, DEFAULT_LAYERS, seed=3, student=student).eval()
    # give the student's BatchNorms non-trivial statistics, as training does
    for module in model.student.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 96, 96), dtype=np.uint8))
    maps, scores = model.predict(images)
    fast = STFPM(teacher, OFFLINE_BACKBONE, DEFAULT_LAYERS, student=student)
    fast.student.load_state_dict(model.student.state_dict())
    fast_maps, fast_scores = fast.for_inference().predict(images)
    assert torch.allclose(fast_scores, scores, rtol=1e-4, atol=0)
    assert float((fast_maps - maps).abs().max()) <= 1e-4 * float(maps.abs().max())
    # every BatchNorm after a convolution is folded; the reverse student's after its transposed
    # convolutions (the decoder's upsampling) are kept
    kept = [m for m in fast.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(kept) == (0 if student == "mirror" else len(model.student.decode))


def test_a_rewritten_teacher_is_shared_not_copied(teacher) -> None:
    # scoring actors rewrite the teacher once and hand it to every category's model
    shared = optimize_for_inference(teacher.network)
    assert optimize_for_inference(shared) is shared


class _NormBeforeConv(nn.Module):
    """Registers conv then norm but runs them the other way round: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.norm.running_mean.fill_(0.3)
        self.norm.running_var.fill_(2.0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.conv(self.norm(x))]


def test_a_fold_that_changes_features_is_refused_with_a_warning() -> None:
    network = _NormBeforeConv()
    with pytest.warns(RuntimeWarning, match="folding BatchNorm changed features"):
        assert optimize_for_inference(network) is network
    assert isinstance(network.norm, nn.BatchNorm2d)


class _RecordsPrecision(nn.Module):
    """A foldable conv + norm that records the TF32 switches each time it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.norm.running_var.fill_(3.0)
        self.seen: list[list[object]] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.seen.append([getattr(owner, name) for owner, name, _ in inference_graph._tf32_switches()])
        return [self.norm(self.conv(x))]


def test_the_fold_is_checked_in_exact_float32_and_the_tf32_settings_are_restored() -> None:
    """On Ampere and later GPUs convolutions run in TF32 (about 1e-3 relative), ten times the tolerance: the
    check runs without TF32, and leaves the settings as the process had them."""
    switches = inference_graph._tf32_switches()
    original = [getattr(owner, name) for owner, name, _ in switches]
    try:
        for owner, name, exact in switches:  # TF32 allowed, as on a GPU node
            setattr(owner, name, "tf32" if isinstance(exact, str) else True)
        before = [getattr(owner, name) for owner, name, _ in switches]
        network = _RecordsPrecision()
        folded = optimize_for_inference(network)
        assert folded is not network and isinstance(folded.norm, nn.Identity)  # the sound fold is kept
        assert network.seen == [[exact for _, _, exact in switches]]  # the original ran in exact float32
        assert [getattr(owner, name) for owner, name, _ in switches] == before != network.seen[0]
        with pytest.warns(RuntimeWarning, match="folding BatchNorm changed features"):  # a wrong fold is caught
            optimize_for_inference(_NormBeforeConv())
    finally:
        for (owner, name, _), value in zip(switches, original):
            setattr(owner, name, value)
