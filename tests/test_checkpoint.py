"""Checkpoint format: bit-exact round trip, safe loading, clear refusals."""

from __future__ import annotations

import json
import shutil

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load, save_file

from stfpm_ray.core import checkpoint, students
from stfpm_ray.core.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    discover_checkpoints,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    validate_checkpoint,
)
from stfpm_ray.core.model import STFPM
from stfpm_ray.core.teacher import create_features, load_teacher
from stfpm_ray.errors import InputNotFoundError, UserError
from stfpm_ray.store.fs import register_filesystem

LAYERS = (1, 2, 3)


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("tf_efficientnet_lite0", LAYERS, "offline")


def _meta(teacher, **overrides) -> CheckpointMeta:
    fields = dict(
        category="widget",
        backbone="tf_efficientnet_lite0",
        layers=list(LAYERS),
        image_size=64,
        teacher_source=teacher.source,
        teacher_sha256=teacher.sha256,
        threshold=0.25,
        normalization={"val_max": 0.25},
        training={"epochs": 1},
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
    summed = save_checkpoint(tmp_path / "sum", model.student, meta, model.memory_bank)
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
    save_checkpoint(
        tmp_path / "c", STFPM(teacher, "tf_efficientnet_lite0", LAYERS).student, _meta(teacher, teacher_sha256="0" * 64)
    )
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


# --- validation on the driver: one line naming the file, for every way a checkpoint can be broken ---


@pytest.fixture(scope="module")
def saved(tmp_path_factory, teacher):
    """One sound checkpoint, trained once; tests tamper with copies of it."""
    folder = tmp_path_factory.mktemp("saved") / "widget"
    student = STFPM(teacher, "tf_efficientnet_lite0", LAYERS, seed=3, student="mirror").student
    save_checkpoint(folder, student, _meta(teacher, student="mirror"))
    return folder


@pytest.fixture
def good(tmp_path, saved):
    return shutil.copytree(saved, tmp_path / "ckpt" / "widget")


def _refusal(folder) -> str:
    with pytest.raises(CheckpointError) as caught:
        validate_checkpoint(folder)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def _edit_meta(folder, **changes) -> None:
    meta_file = folder / "stfpm.json"
    raw = json.loads(meta_file.read_text())
    raw.update(changes)
    meta_file.write_text(json.dumps({k: v for k, v in raw.items() if v is not _DROP}))


_DROP = object()


def test_sound_checkpoint_validates_to_what_was_saved(tmp_path, teacher):
    student = STFPM(teacher, "tf_efficientnet_lite0", LAYERS, seed=5).student
    saved_meta = save_checkpoint(tmp_path / "widget", student, _meta(teacher, threshold=0.125))
    validated = validate_checkpoint(tmp_path / "widget")
    assert validated == saved_meta and validated.threshold == 0.125 and validated.student == "reverse"
    # the model_id it checked is the one the weights' bytes give, not any string the file holds
    assert validated.model_id == checkpoint._model_id(
        (tmp_path / "widget" / "student.safetensors").read_bytes(), validated
    )


def test_a_checkpoint_without_a_student_field_is_a_mirror_student(tmp_path, teacher):
    """Checkpoints written before the field existed hold the only student there was then."""
    student = STFPM(teacher, "tf_efficientnet_lite0", LAYERS, student="mirror").student
    save_checkpoint(tmp_path / "old", student, _meta(teacher, student="mirror"))
    _edit_meta(tmp_path / "old", student=_DROP)
    assert "student" not in json.loads((tmp_path / "old" / "stfpm.json").read_text())
    assert validate_checkpoint(tmp_path / "old").student == "mirror"
    model, _ = load_checkpoint(tmp_path / "old", teacher=teacher)
    assert not model.reads_features


def test_input_shape_is_written_only_for_a_non_square_model(tmp_path, saved, teacher):
    """A square model's stfpm.json has no input_shape (builds older than the field refuse fields they do not
    know); a non-square one records it, and its model id differs from the square one's."""
    assert "input_shape" not in json.loads((saved / "stfpm.json").read_text())
    student = STFPM(teacher, "tf_efficientnet_lite0", LAYERS, seed=3, student="mirror").student
    tall = save_checkpoint(tmp_path / "tall", student, _meta(teacher, student="mirror", input_shape=[160, 64]))
    assert json.loads((tmp_path / "tall" / "stfpm.json").read_text())["input_shape"] == [160, 64]
    assert validate_checkpoint(tmp_path / "tall").input_size == (160, 64)
    assert tall.model_id != read_meta(saved).model_id and read_meta(saved).input_size == (64, 64)


def test_second_validation_reuses_the_student_shapes(good, saved):
    validate_checkpoint(saved)
    hits = students.state_shapes.cache_info().hits
    validate_checkpoint(good)
    assert students.state_shapes.cache_info().hits == hits + 1


def test_refuses_missing_meta(good):
    (good / "stfpm.json").unlink()
    message = _refusal(good)
    assert f"{good / 'stfpm.json'} is missing" in message and "not a checkpoint" in message


def test_refuses_meta_that_is_not_json(good):
    (good / "stfpm.json").write_text("{'category': 'widget',")
    assert f"{good / 'stfpm.json'} is not JSON" in _refusal(good)


def test_refuses_meta_that_is_not_an_object(good):
    (good / "stfpm.json").write_text("[1, 2]")
    assert f"{good / 'stfpm.json'} holds a JSON list" in _refusal(good)


def test_refuses_other_format_version(good):
    _edit_meta(good, format_version=2)
    assert f"{good / 'stfpm.json'} has checkpoint format version 2" in _refusal(good)


@pytest.mark.parametrize(
    ("changes", "cause"),
    [
        ({"epochs": 3}, "unexpected fields ['epochs']"),
        ({"threshold": _DROP}, "missing fields ['threshold']"),
        ({"layers": "1,2,3"}, "fields of the wrong type ['layers']"),
        ({"layers": [1.5, 2]}, "fields of the wrong type ['layers']"),
        ({"input_shape": [160]}, "fields of the wrong type ['input_shape']"),
        ({"input_shape": [160, 100]}, "fields of the wrong type ['input_shape']"),  # not a multiple of 32
        ({"input_shape": [160, 96]}, "fields of the wrong type ['input_shape']"),  # short side is not image_size
    ],
)
def test_refuses_unexpected_missing_or_mistyped_fields(good, changes, cause):
    _edit_meta(good, **changes)
    assert f"{good / 'stfpm.json'} has {cause}" in _refusal(good)


def test_refuses_unknown_backbone(good):
    _edit_meta(good, backbone="efficientnet_b99")
    message = _refusal(good)
    assert str(good / "stfpm.json") in message and "unknown timm backbone 'efficientnet_b99'" in message


def test_refuses_offline_teacher_of_another_hash(good):
    _edit_meta(good, teacher_sha256="0" * 64)
    message = _refusal(good)
    assert str(good / "stfpm.json") in message and "teacher sha256 000000000000" in message
    assert "packaged offline tf_efficientnet_lite0 teacher" in message


def test_refuses_offline_teacher_for_a_backbone_without_offline_weights(good):
    _edit_meta(good, backbone="resnet18")
    message = _refusal(good)
    assert str(good / "stfpm.json") in message and "offline teacher for 'resnet18'" in message


def test_refuses_missing_weights(good):
    (good / "student.safetensors").unlink()
    assert f"{good / 'student.safetensors'} is missing" in _refusal(good)


def test_refuses_pickled_weights_without_unpickling_them(good, saved, monkeypatch):
    validate_checkpoint(saved)  # the packaged teacher's hash is computed (from its .pth) once, beforehand
    torch.save(load((good / "student.safetensors").read_bytes()), good / "student.safetensors")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("validation must never unpickle"))
    assert f"{good / 'student.safetensors'} is not a safetensors file" in _refusal(good)


def test_refuses_truncated_weights(good):
    weights = good / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    message = _refusal(good)
    assert f"{weights} is not a safetensors file" in message and "truncated" in message


def test_refuses_weights_of_another_architecture(good, teacher):
    # a Lite1 student behind Lite0 metadata; saved through save_checkpoint so model_id itself is consistent
    meta = read_meta(good)
    save_checkpoint(good, create_features("tf_efficientnet_lite1", LAYERS), meta)
    message = _refusal(good)
    assert f"{good / 'student.safetensors'} does not hold a mirror tf_efficientnet_lite0 student" in message
    assert "missing tensors" in message


def test_refuses_a_tensor_of_the_wrong_shape(good):
    weights = good / "student.safetensors"
    state = load(weights.read_bytes())  # not load_file: it maps the file this test overwrites
    state["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    save_file(state, weights)
    message = _refusal(good)
    assert f"{weights} does not hold" in message and "conv_stem.weight [16, 3, 3, 3] != [32, 3, 3, 3]" in message


def test_refuses_weights_replaced_after_training(good, teacher):
    other = STFPM(teacher, "tf_efficientnet_lite0", LAYERS, seed=4, student="mirror").student
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, good / "student.safetensors")
    message = _refusal(good)
    model_id = read_meta(good).model_id
    assert f"{good / 'student.safetensors'} does not match model_id '{model_id}'" in message
    assert "weights were replaced after training" in message


def test_discover_reports_the_broken_category_and_keeps_the_sound_one(good, saved, tmp_path):
    root = good.parent
    tampered = shutil.copytree(saved, root / "gadget")
    _edit_meta(tampered, category="gadget")  # model_id does not cover the category: still sound
    (tampered / "student.safetensors").write_bytes(b"\x80\x04junk")
    (root / "_ray" / "run").mkdir(parents=True)
    shutil.copytree(saved, root / ".widget.staging")  # a staging copy is no candidate
    valid, problems = discover_checkpoints(root)
    assert list(valid) == ["widget"] and valid["widget"] == (str(good.resolve()), read_meta(good))
    assert list(problems) == ["gadget"]
    assert str(tampered / "student.safetensors") in problems["gadget"]


def test_discover_names_an_unreadable_folder_by_its_name(good):
    (good.parent / "broken").mkdir()
    (good.parent / "broken" / "student.safetensors").write_bytes(b"")
    valid, problems = discover_checkpoints(good.parent)
    assert list(valid) == ["widget"]
    assert f"{good.parent / 'broken' / 'stfpm.json'} is missing" in problems["broken"]


def test_discover_reads_uris_through_the_storage_layer(good, saved):
    shutil.copytree(saved, good.parent / "gadget")
    _edit_meta(good.parent / "gadget", category="gadget", model_id="0" * 16)
    register_filesystem("ckpt-test", pafs.SubTreeFileSystem(str(good.parent.parent), pafs.LocalFileSystem()))
    valid, problems = discover_checkpoints("ckpt-test://ckpt")
    assert valid["widget"][0] == "ckpt-test://ckpt/widget" and valid["widget"][1] == read_meta(good)
    assert problems["gadget"].startswith("ckpt-test://ckpt/gadget/student.safetensors does not match model_id")


def test_discover_takes_one_checkpoint_folder_itself(good):
    valid, problems = discover_checkpoints(good)
    assert list(valid) == ["widget"] and not problems


def test_discover_refuses_two_checkpoints_of_one_category(good, saved):
    shutil.copytree(saved, good.parent / "widget-copy")
    with pytest.raises(UserError, match="two checkpoints for category 'widget'"):
        discover_checkpoints(good.parent)


def test_discover_refuses_missing_or_empty_root(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        discover_checkpoints(tmp_path / "nowhere")
    (tmp_path / "empty" / "_ray").mkdir(parents=True)
    (tmp_path / "empty" / "notes").mkdir()
    with pytest.raises(InputNotFoundError, match="no checkpoints under"):
        discover_checkpoints(tmp_path / "empty")
