"""Checkpoint format: bit-exact round trip, safe loading, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from stfpm_ray.core.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from stfpm_ray.core.model import STFPM
from stfpm_ray.core.teacher import load_teacher

LAYERS = (1, 2, 3)


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("tf_efficientnet_lite0", LAYERS, "offline")


def _meta(teacher, **overrides) -> CheckpointMeta:
    fields = dict(
        category="widget", backbone="tf_efficientnet_lite0", layers=list(LAYERS), image_size=64,
        teacher_source=teacher.source, teacher_sha256=teacher.sha256, threshold=0.25,
        normalization={"val_max": 0.25}, training={"epochs": 1},
    )
    fields.update(overrides)
    return CheckpointMeta(**fields)


def test_round_trip_is_bit_exact(tmp_path, teacher):
    model = STFPM(teacher, "tf_efficientnet_lite0", LAYERS, seed=7)
    # make the BatchNorm running statistics non-default so they are part of what must survive
    model.train()
    model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    meta = save_checkpoint(tmp_path / "widget", model.student, _meta(teacher))
    assert len(meta.model_id) == 16
    loaded, loaded_meta = load_checkpoint(tmp_path / "widget", teacher=teacher)
    original = model.student.state_dict()
    restored = loaded.student.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert loaded_meta == meta
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    model.eval()
    assert torch.equal(model.predict(images)[0], loaded.predict(images)[0])
    assert not loaded.training


def test_level_scales_survive_and_old_checkpoints_score_with_the_product(tmp_path, teacher):
    model = STFPM(teacher, "tf_efficientnet_lite0", LAYERS, seed=7).eval()
    model.level_scales = (0.1, 0.2, 0.3)
    meta = _meta(teacher, combine="sum", level_scales=[0.1, 0.2, 0.3])
    product = save_checkpoint(tmp_path / "product", model.student, _meta(teacher))
    summed = save_checkpoint(tmp_path / "sum", model.student, meta)
    assert summed.model_id != product.model_id  # same weights and threshold, another map
    loaded, _ = load_checkpoint(tmp_path / "sum", teacher=teacher)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert loaded.level_scales == (0.1, 0.2, 0.3)
    assert torch.equal(model.predict(images)[0], loaded.predict(images)[0])
    # a checkpoint written before the option existed has neither field: it scores with the product
    raw = json.loads((tmp_path / "product" / "stfpm.json").read_text())
    del raw["combine"], raw["level_scales"]
    (tmp_path / "product" / "stfpm.json").write_text(json.dumps(raw))
    old, old_meta = load_checkpoint(tmp_path / "product", teacher=teacher)
    assert old.level_scales is None and old_meta.combine == "product"


def test_model_id_changes_with_weights(tmp_path, teacher):
    a = save_checkpoint(tmp_path / "a", STFPM(teacher, "tf_efficientnet_lite0", LAYERS, seed=1).student, _meta(teacher))
    b = save_checkpoint(tmp_path / "b", STFPM(teacher, "tf_efficientnet_lite0", LAYERS, seed=2).student, _meta(teacher))
    assert a.model_id != b.model_id


def test_refuses_other_teacher(tmp_path, teacher):
    save_checkpoint(tmp_path / "c", STFPM(teacher, "tf_efficientnet_lite0", LAYERS).student, _meta(teacher, teacher_sha256="0" * 64))
    with pytest.raises(CheckpointError, match="teacher"):
        load_checkpoint(tmp_path / "c", teacher=teacher)


def test_refuses_other_version_and_missing(tmp_path, teacher):
    save_checkpoint(tmp_path / "d", STFPM(teacher, "tf_efficientnet_lite0", LAYERS).student, _meta(teacher))
    meta_file = tmp_path / "d" / "stfpm.json"
    raw = json.loads(meta_file.read_text())
    raw["format_version"] = 99
    meta_file.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="format version 99"):
        read_meta(tmp_path / "d")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_meta(tmp_path / "nothing")


def test_refuses_other_backbone_weights(tmp_path, teacher):
    save_checkpoint(tmp_path / "e", STFPM(teacher, "tf_efficientnet_lite0", LAYERS).student, _meta(teacher))
    meta_file = tmp_path / "e" / "stfpm.json"
    raw = json.loads(meta_file.read_text())
    raw["backbone"] = "resnet18"
    meta_file.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="resnet18 student"):
        load_checkpoint(tmp_path / "e", teacher=teacher)
    raw["backbone"] = "tf_efficientnet_lite0"
    meta_file.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="layers"):
        load_checkpoint(tmp_path / "e", teacher=load_teacher("tf_efficientnet_lite0", (1, 2), "offline"))
