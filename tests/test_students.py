"""The reverse student (stfpm_ray.core.reverse): its pyramid, its recipe, and checkpoints that keep it."""

from __future__ import annotations

import json

import pytest
import torch

from stfpm_ray.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, validate_checkpoint
from stfpm_ray.core.fit import TrainConfig, fit_category
from stfpm_ray.core.model import STFPM
from stfpm_ray.core.score import load_scoring_model
from stfpm_ray.core.students import REVERSE_BETAS
from stfpm_ray.core.teacher import load_teacher
from stfpm_ray.data.mvtec import discover_categories
from stfpm_ray.errors import UserError


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("tf_efficientnet_lite0", (1, 2, 3), "offline")


@pytest.fixture(scope="module")
def fitted(synth_root, tmp_path_factory):
    category = discover_categories(synth_root)[0]
    config = TrainConfig(image_size=64, epochs=2, batch_size=8, weights="offline", student="reverse")
    result = fit_category(synth_root, category, config)
    folder = tmp_path_factory.mktemp("reverse") / category
    save_checkpoint(folder, result.model.student, result.meta, result.model.memory_bank)
    return result, folder


def test_it_rebuilds_every_teacher_level_from_the_features_alone(teacher):
    model = STFPM(teacher, "tf_efficientnet_lite0", (1, 2, 3), student="reverse").eval()
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    teacher_features, student_features = model(images)
    assert [t.shape for t in teacher_features] == [s.shape for s in student_features]
    # it reads the teacher's features, not the image: the same features give the same output on any pixels
    _, from_blank = model(torch.zeros_like(images), teacher_features=teacher_features)
    assert all(torch.equal(a, b) for a, b in zip(student_features, from_blank))


def test_a_pyramid_without_doubling_strides_is_refused_with_the_strides():
    teacher = load_teacher("tf_efficientnet_lite0", (1, 3), "offline")
    with pytest.raises(UserError, match=r"strides \[4, 16\]"):
        STFPM(teacher, "tf_efficientnet_lite0", (1, 3), student="reverse")


def test_an_unknown_student_is_a_user_error():
    with pytest.raises(UserError, match="student must be one of reverse, mirror"):
        TrainConfig(student="sideways")


def test_the_reverse_recipe_is_adam_at_its_own_rate(fitted):
    result, _ = fitted
    assert isinstance(result.fitter.optimizer, torch.optim.Adam)
    assert result.fitter.optimizer.defaults["betas"] == REVERSE_BETAS
    assert result.meta.training["lr"] == 0.005 and TrainConfig(student="mirror").lr == 0.4
    assert TrainConfig(student="reverse", lr=0.01).lr == 0.01


def test_its_checkpoint_scores_as_it_was_validated(fitted):
    result, folder = fitted
    meta = validate_checkpoint(folder)
    assert meta.student == "reverse" and meta.model_id == result.meta.model_id
    images = result.fitter.val_images
    expected = result.model.predict(images)[1]
    loaded, _ = load_checkpoint(folder)
    scoring, _ = load_scoring_model(str(folder))
    assert torch.equal(loaded.predict(images)[1], expected)
    assert torch.allclose(scoring.predict(images)[1], expected, rtol=1e-4)
    # rewritten for scoring: the BatchNorm after each convolution is folded into it
    norms = [sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.student.modules()) for model in (loaded, scoring)]
    assert norms[1] < norms[0]


def test_a_checkpoint_whose_student_kind_was_edited_is_refused(fitted, tmp_path):
    _, folder = fitted
    meta_file = folder / "stfpm.json"
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "student.safetensors").write_bytes((folder / "student.safetensors").read_bytes())
    (edited / "stfpm.json").write_text(json.dumps({**json.loads(meta_file.read_text()), "student": "mirror"}))
    with pytest.raises(CheckpointError, match="does not hold a mirror tf_efficientnet_lite0 student"):
        validate_checkpoint(edited)


class _Tiny(torch.nn.Module):
    """A third kind for the registry test: one 1x1 convolution per teacher level."""

    def __init__(self, channels) -> None:
        super().__init__()
        self.levels = torch.nn.ModuleList(torch.nn.Conv2d(c, c, 1) for c in channels)

    def forward(self, features):
        return [level(f) for level, f in zip(self.levels, features)]


def test_a_kind_registered_in_one_place_trains_validates_scores_and_is_offered_by_the_cli(
    synth_root, tmp_path, monkeypatch, capsys
):
    """What adding a student takes: one registry entry. Recipe, optimiser, checkpoint shapes, scoring and the
    CLI's --student choices and help all follow from it."""
    from stfpm_ray import cli
    from stfpm_ray.core import students
    from stfpm_ray.core.teacher import create_features

    def build(backbone, layers):
        with torch.device("meta"):
            channels = create_features(backbone, layers).feature_info.channels()
        return _Tiny(channels)

    tiny = students.StudentKind(
        name="tiny",
        help="one 1x1 convolution per level (a test kind)",
        build=build,
        reads_features=True,
        recipe=students.Recipe(epochs=1, batch_size=4, lr=0.01),
        optimizer=lambda parameters, settings: torch.optim.SGD(parameters, lr=settings.lr),
        unused_parameters=False,
    )
    monkeypatch.setitem(students.STUDENTS, "tiny", tiny)
    config = TrainConfig(student="tiny", image_size=64, weights="offline")
    assert (config.epochs, config.batch_size, config.lr) == (1, 4, 0.01)
    category = discover_categories(synth_root)[0]
    result = fit_category(synth_root, category, config)
    assert isinstance(result.fitter.optimizer, torch.optim.SGD)
    folder = tmp_path / category
    save_checkpoint(folder, result.model.student, result.meta, result.model.memory_bank)
    assert validate_checkpoint(folder).student == "tiny"
    scoring, _ = load_scoring_model(str(folder))
    images = result.fitter.val_images
    assert torch.allclose(scoring.predict(images)[1], result.model.predict(images)[1], rtol=1e-4)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "tiny: one 1x1 convolution per level" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):  # argparse refuses a kind the registry does not hold
        cli.main(["train", "--data", str(synth_root), "--out", str(tmp_path / "o"), "--student", "sideways"])


@pytest.mark.parametrize("student", ["reverse", "mirror"])
def test_data_parallel_students_on_gpus_synchronise_their_batchnorm_and_keep_their_state(teacher, student):
    """A few images per GPU make poor BatchNorm statistics: on GPUs the student's norms are synchronised
    across workers (timm's norm-and-activation layers keep their activation), with the same state dict so
    checkpoints do not change; the frozen teacher and CPU workers (SyncBatchNorm runs on GPUs only) keep
    theirs. Converting needs no GPU."""
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    from stfpm_ray.ray.train_worker import sync_student_batchnorm

    model = STFPM(teacher, "tf_efficientnet_lite0", (1, 2, 3), seed=0, student=student)
    state = model.student.state_dict()
    norms = [type(m) for m in model.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    teacher_norms = [type(m) for m in model.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    acts = [type(m.act) for m in model.student.modules() if isinstance(m, BatchNormAct2d)]
    assert sync_student_batchnorm(model, torch.device("cpu")) is model
    assert [type(m) for m in model.student.modules() if isinstance(m, torch.nn.BatchNorm2d)] == norms
    synced = sync_student_batchnorm(model, torch.device("cuda"))
    converted = [m for m in synced.student.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(converted) == len(norms) > 0
    expected = [SyncBatchNormAct if kind is BatchNormAct2d else torch.nn.SyncBatchNorm for kind in norms]
    assert [type(m) for m in converted] == expected
    assert [type(m.act) for m in converted if isinstance(m, SyncBatchNormAct)] == acts
    assert [type(m) for m in synced.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)] == teacher_norms
    after = synced.student.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_the_reverse_student_smooths_its_maps_by_default_and_the_mirror_one_keeps_the_raw_map():
    assert TrainConfig(image_size=256).map_sigma == 4.0 and TrainConfig(image_size=128).map_sigma == 2.0
    assert TrainConfig(image_size=256, student="mirror").map_sigma == 0.0
    assert TrainConfig(image_size=256, map_sigma=0).map_sigma == 0.0
