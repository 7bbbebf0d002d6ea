"""A later day that drifts, end to end: `score` detects that the operating point no longer holds and says so
(exit status 4), `calibrate` sets a new one from ten known-good images of that day, and the rows already in the
table are decided again by `evaluate` without rescoring; the next night decides with the new point. Or, with no
good image of the day at hand, `calibrate --adaptive` lets each night set its threshold from its own scores.

The later day is the same synthetic category captured again (another seed) by a noisier camera: Gaussian
sensor noise of 10 grey levels, which lifts every image's score while keeping good and defective apart.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stfpm_ray import cli
from stfpm_ray.core.checkpoint import save_checkpoint
from stfpm_ray.core.fit import TrainConfig, fit_category
from stfpm_ray.data.synth import generate_dataset
from stfpm_ray.store.scores import ScoresTable

pytestmark = pytest.mark.slow

CATEGORY = "weave"
NOISE = 10.0
TARGET_FAR = 0.05


def _noisy_copy(source: Path, target: Path, seed: int) -> None:
    pixels = np.asarray(Image.open(source).convert("RGB"), dtype=np.float64)
    pixels += np.random.default_rng(seed).normal(0.0, NOISE, pixels.shape)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)).save(target)


def _later_day(raw: Path, archive: Path, known_good: Path) -> None:
    """The day's archive in the MVTec layout (its test images and 30 more good ones, labelled by their folders),
    and ten other good images of the day that the operator knows to be good."""
    captures = raw / CATEGORY
    for index, image in enumerate(sorted(captures.glob("test/*/*.png"))):
        _noisy_copy(image, archive / CATEGORY / image.relative_to(captures), seed=index)
    shutil.copytree(captures / "ground_truth", archive / CATEGORY / "ground_truth")
    good = sorted(captures.glob("train/good/*.png"))
    for index, image in enumerate(good[:10]):
        _noisy_copy(image, known_good / image.name, seed=1000 + index)
    for index, image in enumerate(good[10:]):
        _noisy_copy(image, archive / CATEGORY / "test" / "good" / f"day-{image.name}", seed=2000 + index)


@dataclass(frozen=True)
class DriftedDay:
    checkpoints: Path
    archive: Path
    known_good: Path


@pytest.fixture(scope="module")
def drifted_day(tmp_path_factory) -> DriftedDay:
    """A model trained on day 1, the later day's labelled archive, and ten known-good images of that day."""
    root = tmp_path_factory.mktemp("drift")
    day1, raw, archive, known_good = (root / name for name in ("day1", "raw", "archive", "known-good"))
    generate_dataset(day1, categories=1, size=64, n_train=40, n_test=20, seed=0)
    generate_dataset(raw, categories=1, size=64, n_train=40, n_test=60, seed=1)
    config = TrainConfig(image_size=64, epochs=20, weights="offline", target_far=TARGET_FAR)
    result = fit_category(day1, CATEGORY, config)
    save_checkpoint(root / "ckpt" / CATEGORY, result.model.student, result.meta, result.model.memory_bank)
    _later_day(raw, archive, known_good)
    return DriftedDay(root / "ckpt", archive, known_good)


def _night_of_good_images(root: Path, night: Path) -> None:
    """24 good images of the later day's conditions, in a folder of their own, as a nightly archive gets them."""
    generate_dataset(root / "raw-2", categories=1, size=64, n_train=24, n_test=2, seed=2)
    for index, image in enumerate(sorted((root / "raw-2" / CATEGORY / "train" / "good").glob("*.png"))):
        _noisy_copy(image, night / image.name, seed=3000 + index)


def _own_checkpoints(day: DriftedDay, tmp_path: Path) -> str:
    """A copy of the checkpoints for one test: calibrating changes them."""
    shutil.copytree(day.checkpoints, tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


def test_a_drifted_day_is_detected_and_ten_good_images_of_it_restore_the_operating_point(
    ray_session, drifted_day, tmp_path, capsys
):
    archive, known_good = drifted_day.archive, drifted_day.known_good
    scores, ckpt = tmp_path / "scores", _own_checkpoints(drifted_day, tmp_path)

    # the day is scored with the training day's operating point: it no longer holds, and the run says so
    assert cli.main(["score", "--checkpoints", ckpt, "--input", str(archive), "--out", str(scores)]) == 4
    printed = capsys.readouterr().out
    assert f"{CATEGORY}: the operating point (training) no longer holds: labelled good images: " in printed
    assert f"stfpm-ray calibrate --checkpoints {ckpt} --category {CATEGORY} --good FOLDER" in printed
    summary_row = next(line.split() for line in printed.splitlines() if line.startswith(f"{CATEGORY} "))
    assert (
        summary_row[1:4] == ["90", "0", "0"] and int(summary_row[4]) > 45
    )  # flagged: half the good images, most defective
    assert ScoresTable(str(scores)).history()[0]["manifest"]["operating_points"] == {CATEGORY: "training"}

    # ten good images of the day set a new operating point; the table's rows are decided again when read
    assert cli.main(["calibrate", "--checkpoints", ckpt, "--category", CATEGORY, "--good", str(known_good)]) == 0
    assert cli.main(["evaluate", "--scores", str(scores), "--out", str(tmp_path / "report")]) == 0
    entry = json.loads((tmp_path / "report" / "metrics.json").read_text())["categories"][CATEGORY]
    assert entry["operating_point"]["id"] == "calibrate-1" and not entry["drift"]["detected"]
    assert entry["n_good"] == 54 and entry["n_defective"] > 20 and entry["n_decided_anew"] > 0
    assert entry["image_auroc"] >= 0.99  # the ranking allows it, so:
    assert entry["false_alarm_rate"] <= 2 * TARGET_FAR and entry["recall"] >= 0.9
    assert [point["id"] for point in entry["operating_history"]] == ["training", "calibrate-1"]

    # the next night of the same conditions is decided with the new point, which holds
    night = tmp_path / "night-2"
    _night_of_good_images(tmp_path, night)
    argv = ["nightly", "--checkpoints", ckpt, "--input", str(night), "--out", str(scores), "--category", CATEGORY]
    assert cli.main(argv) == 0
    report = json.loads(next((scores / "_reports").glob("nightly-*.json")).read_text())
    assert report["drifted"] == [] and report["categories"][CATEGORY]["drift"]["operating_point"] == "calibrate-1"
    assert report["categories"][CATEGORY]["anomalous"] <= 3  # of 24 good images, at a 5% target


def test_an_adaptive_point_lets_each_night_set_its_threshold_without_good_images_of_the_day(
    ray_session, drifted_day, tmp_path, capsys
):
    ckpt, night, scores = _own_checkpoints(drifted_day, tmp_path), tmp_path / "night", tmp_path / "scores"
    _night_of_good_images(tmp_path, night)
    argv = ["nightly", "--checkpoints", ckpt, "--input", str(night), "--out", str(scores), "--category", CATEGORY]
    assert cli.main(argv) == 4  # the training day's point flags the noisy night
    before = json.loads(next((scores / "_reports").glob("nightly-*.json")).read_text())["categories"][CATEGORY]
    assert before["anomalous"] > 12

    assert cli.main(["calibrate", "--checkpoints", ckpt, "--category", CATEGORY, "--adaptive"]) == 0
    printed = capsys.readouterr().out
    assert "adaptive operating point calibrate-1 from the good scores of training" in printed

    # the night already scored is decided again at its own threshold when read; nothing is rescored
    assert cli.main(["evaluate", "--scores", str(scores), "--out", str(tmp_path / "report")]) == 0
    entry = json.loads((tmp_path / "report" / "metrics.json").read_text())["categories"][CATEGORY]
    assert entry["operating_point"]["method"] == "adaptive" and not entry["drift"]["detected"]
    (night_threshold,) = entry["run_thresholds"].values()
    assert night_threshold > entry["threshold"]  # the night's scores moved up, and its threshold with them
    assert entry["n_flagged"] <= 3 and entry["n_decided_anew"] >= before["anomalous"] - 3

    # a labelled later day, scored under the adaptive point: its good images stay near the target
    day = tmp_path / "day"
    assert cli.main(["score", "--checkpoints", ckpt, "--input", str(drifted_day.archive), "--out", str(day)]) == 0
    assert cli.main(["evaluate", "--scores", str(day), "--out", str(tmp_path / "day-report")]) == 0
    entry = json.loads((tmp_path / "day-report" / "metrics.json").read_text())["categories"][CATEGORY]
    assert entry["false_alarm_rate"] <= 2 * TARGET_FAR and entry["image_auroc"] >= 0.99
