"""The maths of STFPM pinned on hand-computed cases, and the teacher's frozen state."""

from __future__ import annotations

import pytest
import torch

from stfpm_ray.core.anomaly_map import anomaly_map, default_map_sigma, feature_distance, smooth_maps
from stfpm_ray.core.model import STFPM, describe_precision, resolve_precision, stfpm_loss
from stfpm_ray.core.teacher import load_teacher


def _hand_case():
    # Level 1: two positions. Position 0: t=(1,0), s=(0,1) -> normalised diff (1,-1) -> 0.5*2 = 1.
    # Position 1: t=(3,4), s=(6,8) -> same direction -> 0.
    t1 = torch.tensor([[[[1.0, 3.0]], [[0.0, 4.0]]]])
    s1 = torch.tensor([[[[0.0, 6.0]], [[1.0, 8.0]]]])
    # Level 2: one position, one channel: t=2, s=-1 -> normalised 1 and -1 -> 0.5*4 = 2.
    t2 = torch.tensor([[[[2.0]]]])
    s2 = torch.tensor([[[[-1.0]]]])
    return [t1, t2], [s1, s2]


def test_feature_distance_hand_computed():
    (t1, _), (s1, _) = _hand_case()
    assert torch.allclose(feature_distance(t1, s1), torch.tensor([[[1.0, 0.0]]]))


def test_loss_hand_computed():
    teacher, student = _hand_case()
    # mean of level 1 = 0.5, level 2 = 2 -> 2.5
    assert stfpm_loss(teacher, student).item() == pytest.approx(2.5)


def test_loss_averages_over_batch():
    teacher, student = _hand_case()
    doubled_t = [torch.cat([t, t]) for t in teacher]
    doubled_s = [torch.cat([s, s]) for s in student]
    assert stfpm_loss(doubled_t, doubled_s).item() == pytest.approx(2.5)


def test_flat_loss_weighs_positions_by_feature_norm():
    teacher, student = _hand_case()
    # level 1 flattened: t=(1,3,0,4), s=(0,6,1,8): 1 - 50/sqrt(26*101); the disagreeing position has the small
    # norm and counts little (the position loss gives it 0.5). Level 2: cosine -1 -> 2.
    expected = 1 - 50 / (26 * 101) ** 0.5 + 2
    assert stfpm_loss(teacher, student, "flat").item() == pytest.approx(expected)
    doubled = [torch.cat([t, t]) for t in teacher], [torch.cat([s, s]) for s in student]
    assert stfpm_loss(*doubled, "flat").item() == pytest.approx(expected)


def test_hard_loss_keeps_the_hardest_positions_only():
    """Of 200 positions (two images of 10 x 10, one level), the two at or above the 0.99 quantile count."""
    teacher = torch.zeros(2, 2, 10, 10)
    teacher[:, 0] = 1.0
    student = teacher.clone()
    student[0, :, 3, 4] = torch.tensor([0.0, 1.0])  # orthogonal: distance 1
    student[1, :, 7, 7] = torch.tensor([-1.0, 0.0])  # opposite: distance 2
    student[1, :, 0, 0] = torch.tensor([1.0, 1.0])  # 45 degrees: 1 - cos 45 = 0.293, below the cut
    assert stfpm_loss([teacher], [student], "hard").item() == pytest.approx(1.5)
    assert stfpm_loss([teacher], [student], "position").item() == pytest.approx((1 + 2 + 0.2929) / 200, rel=1e-3)


def test_anomaly_map_hand_computed():
    teacher, student = _hand_case()
    # level 1 map [1, 0] at (1, 2); level 2 map [2] upsampled to [2, 2]; product [2, 0]
    result = anomaly_map(teacher, student, (1, 2))
    assert result.shape == (1, 1, 2)
    assert torch.allclose(result, torch.tensor([[[2.0, 0.0]]]))


def test_calibrated_sum_hand_computed():
    teacher, student = _hand_case()
    # level maps [1, 0] and [2, 2] (as above), divided by scales 0.5 and 4, averaged: [(2 + 0.5) / 2, (0 + 0.5) / 2]
    result = anomaly_map(teacher, student, (1, 2), level_scales=(0.5, 4.0))
    assert torch.allclose(result, torch.tensor([[[1.25, 0.25]]]))
    with pytest.raises(ValueError, match="2 level scales for 2 levels|1 level scales"):
        anomaly_map(teacher, student, (1, 2), level_scales=(1.0,))


def test_anomaly_map_upsamples_bilinearly_to_input_size():
    t = torch.ones(1, 1, 2, 2)
    s = torch.ones(1, 1, 2, 2)
    s[0, 0, 0, 0] = -1.0
    result = anomaly_map([t, t], [s, s], (8, 8))
    assert result.shape == (1, 8, 8)
    # the single deviating position is top-left; the product of two identical levels is the square
    level = torch.nn.functional.interpolate(feature_distance(t, s).unsqueeze(1), size=(8, 8), mode="bilinear")
    assert torch.allclose(result, level.squeeze(1) ** 2)
    assert result[0, 0, 0] > result[0, 7, 7]


@pytest.fixture(scope="module")
def model():
    return STFPM(load_teacher("tf_efficientnet_lite0", (1, 2, 3), "offline"), "tf_efficientnet_lite0", (1, 2, 3))


def test_teacher_frozen_and_in_eval_after_train(model):
    model.train()
    assert all(not m.training for m in model.teacher.modules())
    assert all(m.training for m in model.student.modules())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    loss = stfpm_loss(*model(images))
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student.parameters())
    # BatchNorm running statistics of the teacher did not move in a training-mode forward
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_smoothing_spreads_a_hot_pixel_more_than_a_defect_sized_blob_and_keeps_mass():
    maps = torch.zeros(2, 64, 64)
    maps[0, 32, 32] = 1.0  # one feature position that happens to disagree
    maps[1, 28:37, 28:37] = 1.0  # a defect covering several positions
    smoothed = smooth_maps(maps, default_map_sigma(256))
    assert default_map_sigma(256) == 4.0 and smooth_maps(maps, 0.0) is maps
    assert smoothed[0].max() < 0.02 and smoothed[1].max() > 0.5  # the blob now outscores the hot pixel
    assert torch.allclose(smoothed.sum(dim=(1, 2)), maps.sum(dim=(1, 2)), rtol=1e-4)  # nothing lost inside
    assert torch.allclose(smooth_maps(torch.full((1, 16, 16), 0.3), 2.0), torch.full((1, 16, 16), 0.3))


def test_predict_shapes_and_score_is_map_max(model):
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    maps, scores = model.predict(images)
    assert maps.shape == (3, 64, 64)
    assert torch.allclose(scores, maps.flatten(1).amax(1))
    assert (maps >= 0).all()


def test_student_init_is_seeded():
    teacher = load_teacher("tf_efficientnet_lite0", (1, 2, 3), "offline")
    a = STFPM(teacher, "tf_efficientnet_lite0", (1, 2, 3), seed=3).student.state_dict()
    b = STFPM(teacher, "tf_efficientnet_lite0", (1, 2, 3), seed=3).student.state_dict()
    c = STFPM(teacher, "tf_efficientnet_lite0", (1, 2, 3), seed=4).student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_precision_auto_is_exact_on_cpu_and_unknown_names_are_refused():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


def test_auto_precision_follows_the_calibration_and_never_picks_emulated_bf16(monkeypatch):
    """``auto`` scores as the threshold was calibrated (fp32 for every checkpoint so far), and bf16 only where
    the card runs it natively: compute capability 8.0 or later, whatever ``is_bf16_supported`` says (it counts
    emulation on older cards)."""
    capability = {"value": (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    assert resolve_precision("auto", "cuda") == "fp32"  # calibrated in fp32 (the default): scored in fp32
    assert resolve_precision("auto", "cuda", calibrated="fp32") == "fp32"
    assert resolve_precision("auto", "cuda:0", calibrated="bf16") == "bf16"
    assert resolve_precision("auto", "cpu", calibrated="bf16") == "fp32"
    capability["value"] = (7, 5)  # a T4: bf16 emulated
    assert resolve_precision("auto", "cuda", calibrated="bf16") == "fp32"
    assert resolve_precision("bf16", "cuda", calibrated="fp32") == "bf16"  # asked for: taken as asked
    assert "as the thresholds were calibrated: fp32" in describe_precision("auto", ["fp32", "fp32"])
    assert "calibrated in fp32" in describe_precision("bf16", ["fp32"])
    assert describe_precision("fp32", ["fp32"]) == "precision fp32"


def test_bf16_predict_stays_close_to_fp32(model):
    model.eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    maps, scores = model.predict(images)
    bf16_maps, bf16_scores = model.predict(images, "bf16")
    assert bf16_maps.dtype == torch.float32  # distances and maps are computed in float32 either way
    assert torch.allclose(bf16_scores, scores, rtol=0.05, atol=0)
    assert not torch.equal(bf16_maps, maps)  # the networks did run in bfloat16
