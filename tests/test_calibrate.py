"""`stfpm-ray calibrate` (stfpm_ray.workflows.calibrate): a new operating point from known-good images, the
earlier ones kept, weights and model id unchanged, and scoring deciding with it from then on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import plain_folder

from stfpm_ray import cli
from stfpm_ray.core.calibration import MIN_RUN_IMAGES, calibration, later_point, new_point
from stfpm_ray.core.checkpoint import CheckpointError, load_checkpoint, read_meta, validate_checkpoint
from stfpm_ray.core.score import ScoreSettings, score_batch
from stfpm_ray.data.images import load_image
from stfpm_ray.workflows.calibrate import MIN_GOOD_IMAGES, calibrate


@pytest.fixture
def checkpoints(trained, tmp_path) -> Path:
    """A copy of the session's checkpoints that a test may recalibrate."""
    return Path(shutil.copytree(trained[0], tmp_path / "ckpt"))


def _good(synth_root: Path, category: str, target: Path, count: int) -> list[Path]:
    target.mkdir(parents=True)
    sources = sorted((synth_root / category / "train" / "good").glob("*.png"))[:count]
    return [Path(shutil.copy(source, target / source.name)) for source in sources]


def test_a_new_operating_point_is_recorded_and_decides_from_then_on(checkpoints, trained, synth_root, tmp_path):
    category = trained[1][0]
    before = validate_checkpoint(checkpoints / category)
    images = _good(synth_root, category, tmp_path / "good", 8)
    lines: list[str] = []
    result = calibrate(checkpoints, str(tmp_path / "good"), category=category, target_far=0.1, progress=lines.append)

    after = validate_checkpoint(checkpoints / category)  # still sound: weights and model_id as they were
    assert after.model_id == before.model_id and after.threshold == before.threshold
    assert [p.id for p in after.operating_history] == ["training", "calibrate-1"]
    point = after.operating_point
    assert point.target_far == 0.1 and len(point.scores) == 8 and point.threshold >= max(point.scores)
    assert point.source == f"8 good images under {tmp_path / 'good'}" and point.created_at
    assert point.precision == after.operating_points[-1]["precision"] == "fp32"  # scored as calibrate scores
    assert result["point"]["id"] == "calibrate-1" and result["after"] == 0  # none of its own images flagged
    assert f"[{category}] operating point calibrate-1 from 8 good images" in lines[0]

    # scoring decides with the point in force: the same image, the new threshold
    model, meta = load_checkpoint(checkpoints / category)
    batch = torch.from_numpy(np.stack([load_image(p, meta.image_size) for p in images])).permute(0, 3, 1, 2)
    scored = score_batch(model.eval(), meta, batch, ScoreSettings())
    assert [s.is_anomalous for s in scored] == [s.score > point.threshold for s in scored]
    assert scored[0].score_norm == pytest.approx(scored[0].score / point.threshold)

    # a second calibration adds a point; the first stays in the record
    calibrate(checkpoints, str(tmp_path / "good"), category=category, progress=lines.append)
    assert [p.id for p in read_meta(checkpoints / category).operating_history] == [
        "training",
        "calibrate-1",
        "calibrate-2",
    ]
    assert read_meta(checkpoints / category).operating_point.target_far == 0.1  # the target in force carries on


def test_unreadable_images_are_skipped_and_too_few_good_images_are_refused(checkpoints, trained, synth_root, tmp_path):
    category = trained[1][0]
    good = tmp_path / "good"
    plain_folder(good, synth_root, category, MIN_GOOD_IMAGES - 1)
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    lines: list[str] = []
    with pytest.raises(ValueError, match=f"4 readable good images .* at least {MIN_GOOD_IMAGES}"):
        calibrate(checkpoints, str(good), category=category, progress=lines.append)
    assert any("skipped" in line and "broken.png" in line for line in lines)
    assert read_meta(checkpoints / category).operating_points == []  # nothing written


def test_the_category_must_be_named_when_there_is_a_choice(checkpoints, trained, synth_root, tmp_path, capsys):
    good = tmp_path / "good"
    plain_folder(good, synth_root, trained[1][0], MIN_GOOD_IMAGES)
    assert cli.main(["calibrate", "--checkpoints", str(checkpoints), "--good", str(good)]) == 2
    assert "pass --category" in capsys.readouterr().err
    assert cli.main(["calibrate", "--checkpoints", str(checkpoints), "--good", str(good), "--category", "nope"]) == 2
    assert "no checkpoint for category 'nope'" in capsys.readouterr().err
    assert cli.main(["calibrate", "--checkpoints", str(checkpoints / trained[1][0]), "--good", str(good)]) == 0


def test_a_hand_edited_operating_point_is_refused_in_one_line(checkpoints, trained, tmp_path):
    folder = checkpoints / trained[1][0]
    raw = json.loads((folder / "stfpm.json").read_text())
    raw["operating_points"] = [
        {"id": "calibrate-1", "threshold": -1.0, "target_far": 0.05, "source": "x", "method": "max"}
    ]
    (folder / "stfpm.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"fields of the wrong type \['operating_points'\]"):
        validate_checkpoint(folder)


def test_an_adaptive_point_sets_each_runs_threshold_from_the_run_and_keeps_the_fixed_one_for_small_runs():
    rng = np.random.default_rng(0)
    good = np.exp(rng.normal(-3.0, 0.3, 60))
    point = later_point(new_point(good, 0.05, "test", [], adaptive=True))
    assert point.adaptive and point.threshold == calibration(good, 0.05)[0]
    # a night of 400 images, 5% of them defective and far out: its good images are flagged near the target
    night = np.concatenate([np.exp(rng.normal(-2.0, 0.3, 380)), np.exp(rng.normal(0.0, 0.3, 20))])
    threshold = point.threshold_for(night)
    fresh_good = np.exp(rng.normal(-2.0, 0.3, 100_000))
    assert 0.03 < (fresh_good > threshold).mean() < 0.08 and (night[380:] > threshold).all()
    assert point.threshold_for(3.0 * night) == pytest.approx(3.0 * threshold)  # moved as a whole: moves along
    assert point.threshold_for(night[: MIN_RUN_IMAGES - 1]) == point.threshold  # too few to trust
    assert point.threshold_for(np.full(30, 0.1)) == point.threshold  # no spread to measure in


def test_calibrate_without_good_images_makes_an_adaptive_point_only(checkpoints, trained, capsys):
    folder = checkpoints / trained[1][0]
    assert cli.main(["calibrate", "--checkpoints", str(folder)]) == 2
    assert "--good is required" in capsys.readouterr().err
    training = read_meta(folder).operating_point
    assert cli.main(["calibrate", "--checkpoints", str(folder), "--adaptive"]) == 0
    point = validate_checkpoint(folder).operating_point
    assert (point.id, point.method, point.scores) == ("calibrate-1", "adaptive", training.scores)
    assert point.threshold == training.threshold and point.record["fixed_method"] == training.method
