"""The fit recipe (stfpm_ray.core.fit): a seeded split, unreadable training images skipped with a message,
students that separate defects, the calibrated level sum, and the deployed threshold: calibrated on held-out
good scores at a target false-alarm rate, recorded in the checkpoint (checkpoints written before the record
keep scoring with their stored threshold)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from stfpm_ray.cli.options import add_training_options, train_config
from stfpm_ray.core import model as stfpm_model
from stfpm_ray.core.calibration import CALIBRATION_METHOD, calibration, training_point
from stfpm_ray.core.checkpoint import META_FILE, load_checkpoint, read_meta, save_checkpoint, validate_checkpoint
from stfpm_ray.core.fit import TrainConfig, fit_category, load_images, rank_batches, split_train_val
from stfpm_ray.core.score import ScoreSettings, score_batch
from stfpm_ray.data import mvtec
from stfpm_ray.data.images import load_image
from stfpm_ray.data.mvtec import discover_categories, train_images
from stfpm_ray.errors import UserError
from stfpm_ray.evaluate.metrics import image_auroc

# Validation scores drawn from a known distribution, many times: the false-alarm rate of each threshold on
# the population is exact (the distribution's survival function), not estimated from a few test images.
DRAWS = 2000


def _population_far(distribution, n: int, target: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated, maximum) thresholds' population false-alarm rates over DRAWS validation sets of size n."""
    rng = np.random.default_rng(seed)
    new, old = np.empty(DRAWS), np.empty(DRAWS)
    for i in range(DRAWS):
        scores = distribution.rvs(n, random_state=rng)
        new[i] = distribution.sf(calibration(scores, target)[0])
        old[i] = distribution.sf(scores.max())
    return new, old


@pytest.mark.parametrize("n", [5, 8, 20, 42])
def test_small_validation_sets_give_the_target_rate_on_log_normal_scores(n):
    """The t prediction bound gives the target rate in expectation at any n; the maximum gives 1/(n+1)."""
    new, old = _population_far(stats.lognorm(0.3, scale=0.2), n, target=0.01)
    assert 0.006 < new.mean() < 0.0115
    assert old.mean() == pytest.approx(1 / (n + 1), rel=0.15)
    assert new.mean() < old.mean() / 2


def test_heavier_tailed_scores_stay_within_a_few_times_the_target():
    """Image scores are maxima over a map: a Gumbel tail, heavier than the log-normal the fit assumes. With
    8 validation images the rate stays a few times the target, far below the maximum's 11%."""
    new, old = _population_far(stats.gumbel_r(loc=1.0, scale=0.1), 8, target=0.01)
    assert new.mean() < 0.035 and old.mean() > 0.09


def test_record_and_floor_at_the_validation_maximum():
    scores = np.array([0.20, 0.21, 0.22, 0.23, 0.24, 0.25, 0.26, 0.40])
    threshold, normalization, record = calibration(scores, 0.01)
    logs = np.log(scores)
    factor = stats.t.ppf(0.99, df=7) * math.sqrt(1 + 1 / 8)
    assert record["method"] == CALIBRATION_METHOD and record["target_far"] == 0.01 and record["n_val"] == 8
    assert record["log_mean"] == pytest.approx(logs.mean()) and record["log_std"] == pytest.approx(logs.std(ddof=1))
    assert record["t_factor"] == pytest.approx(factor)
    assert record["fitted_threshold"] == pytest.approx(math.exp(logs.mean() + factor * logs.std(ddof=1)))
    assert threshold == max(record["fitted_threshold"], 0.40) and record["val_max"] == normalization["val_max"] == 0.40
    assert record["floor_rank"] == 1 and record["floor"] == 0.40  # 8 images at 1%: the largest score
    assert record["bound"] == ("fit" if record["fitted_threshold"] >= 0.40 else "val_max")
    # a loose target allows flagging some good images: the floor is the 2nd largest (k = floor(9 * 0.3)), so
    # the outlying maximum does not set the threshold
    loose, _, loose_record = calibration(scores, 0.3)
    assert loose_record["floor_rank"] == 2 and loose_record["floor"] == 0.26
    assert loose == max(loose_record["fitted_threshold"], 0.26) < 0.40
    json.dumps(record)  # stored in stfpm.json


def test_one_outlying_good_image_does_not_set_the_threshold_of_a_large_validation_set():
    """88 validation images at 5% (elpv_mono's count): the floor is the 4th largest score, not the outlier."""
    scores = np.random.default_rng(0).lognormal(-2.5, 0.25, 88)
    scores[0] = 3 * scores.max()
    threshold, _, record = calibration(scores, 0.05)
    assert record["floor_rank"] == 4 and threshold < scores[0] / 2
    assert threshold == max(record["fitted_threshold"], np.sort(scores)[-4])


@pytest.mark.parametrize("n", [40, 64, 120])
def test_the_order_statistic_floor_keeps_the_target_on_heavy_tailed_scores(n):
    """Where the log-normal fit is too light for the scores' tail, the k-th largest score still holds the
    target in expectation (k/(n+1) <= target, whatever the distribution); the maximum would hold 1/(n+1)."""
    new, old = _population_far(stats.pareto(3.0, scale=0.1), n, target=0.05)
    assert new.mean() <= 0.05 * 1.1 and old.mean() == pytest.approx(1 / (n + 1), rel=0.2)


@pytest.mark.parametrize("scores", [np.array([0.3, 0.2]), np.array([0.3, 0.0, 0.2, 0.25])])
def test_too_few_or_non_positive_scores_keep_the_maximum(scores):
    threshold, _, record = calibration(scores, 0.01)
    assert threshold == 0.3 and record == {
        "method": "max",
        "target_far": 0.01,
        "n_val": len(scores),
        "val_max": 0.3,
        "scores": list(scores),
        "precision": "fp32",
    }


@pytest.mark.parametrize("far", [0.0, 0.5, -0.1])
def test_target_far_out_of_range_is_refused(far):
    with pytest.raises(UserError, match="target false-alarm rate"):
        TrainConfig(target_far=far)


def test_the_loss_is_a_recipe_field_the_cli_sets_and_checks():
    parser = argparse.ArgumentParser()
    add_training_options(parser)
    assert train_config(parser.parse_args(["--loss", "flat"])).loss == "flat"
    assert train_config(parser.parse_args([])).loss == "position"
    with pytest.raises(UserError, match="loss must be one of position, flat"):
        TrainConfig(loss="l2")


def test_the_cli_flag_sets_the_target():
    parser = argparse.ArgumentParser()
    add_training_options(parser)
    assert train_config(parser.parse_args(["--target-far", "0.002"])).target_far == 0.002
    assert train_config(parser.parse_args([])).target_far == TrainConfig().target_far


@pytest.fixture(scope="module")
def fitted(synth_root, tmp_path_factory):
    category = mvtec.discover_categories(synth_root)[0]
    config = TrainConfig(image_size=64, epochs=1, batch_size=8, weights="offline", target_far=0.05)
    result = fit_category(synth_root, category, config)
    folder = tmp_path_factory.mktemp("calibrated") / category
    return (
        synth_root,
        category,
        folder,
        save_checkpoint(folder, result.model.student, result.meta, result.model.memory_bank),
    )


def test_the_checkpoint_records_the_calibration(fitted):
    _, _, folder, meta = fitted
    record = read_meta(folder).calibration
    assert record == meta.calibration and record["method"] == CALIBRATION_METHOD and record["target_far"] == 0.05
    assert record["n_val"] == meta.training["val_images"] == int(meta.normalization["val_count"])
    assert meta.threshold == max(record["fitted_threshold"], record["val_max"]) and meta.training["target_far"] == 0.05
    assert validate_checkpoint(folder) == meta


def test_a_checkpoint_without_the_record_scores_with_its_stored_threshold(fitted):
    root, category, folder, meta = fitted
    raw = json.loads((folder / META_FILE).read_text())
    del raw["calibration"]  # as written before calibration was recorded
    (folder / META_FILE).write_text(json.dumps(raw))
    old = validate_checkpoint(folder)  # model_id still matches: it covers the threshold, not how it was set
    assert old.calibration == {} and old.threshold == meta.threshold and old.model_id == meta.model_id
    model, loaded = load_checkpoint(folder)
    images, _ = load_images([sample.path for sample in mvtec.test_samples(root, category)], meta.image_size)
    with torch.inference_mode():
        scored = score_batch(model, loaded, images)
    assert [s.is_anomalous for s in scored] == [s.score > meta.threshold for s in scored]
    assert [s.score_norm for s in scored] == pytest.approx([s.score / meta.threshold for s in scored])


def test_auto_precision_scores_in_the_precision_the_threshold_was_calibrated_in(fitted, monkeypatch):
    """Training records the precision of its validation scores; a record without one (older checkpoints)
    means fp32; ``auto`` scores in the recorded precision where the device runs it natively."""
    _, _, folder, meta = fitted
    assert meta.calibration["precision"] == "fp32" and meta.operating_point.precision == "fp32"
    legacy = {key: value for key, value in meta.calibration.items() if key != "precision"}
    assert training_point(meta.threshold, legacy).precision == "fp32"
    model, _ = load_checkpoint(folder)
    asked: list[str] = []
    predict = model.predict

    def spy(images: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        asked.append(precision)
        return predict(images, precision)

    monkeypatch.setattr(model, "predict", spy)
    monkeypatch.setattr(stfpm_model, "native_bf16", lambda device: True)  # as on an Ampere or later GPU
    images = torch.zeros(2, 3, meta.image_size, meta.image_size, dtype=torch.uint8)
    bf16_point = replace(meta, calibration={**meta.calibration, "precision": "bf16"})
    with torch.inference_mode():
        score_batch(model, meta, images, ScoreSettings(precision="auto"))
        score_batch(model, bf16_point, images, ScoreSettings(precision="auto"))
        score_batch(model, meta, images, ScoreSettings(precision="bf16"))
    assert asked == ["fp32", "bf16", "bf16"]


def test_split_is_seeded_and_disjoint():
    paths = [Path(f"{i:03d}.png") for i in range(50)]
    train, val = split_train_val(paths, 0.2, seed=1)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 50
    assert split_train_val(paths, 0.2, seed=1) == (train, val)
    assert split_train_val(paths, 0.2, seed=2)[1] != val


def test_corrupt_training_image_is_skipped_with_a_message(tmp_path, synth_root, caplog):
    category = discover_categories(synth_root)[0]
    root = tmp_path / "data"
    good = root / category / "train" / "good"
    good.mkdir(parents=True)
    for path in map(Path, train_images(synth_root, category)[:6]):
        (good / path.name).write_bytes(path.read_bytes())
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.full((64, 64, 4), 200, dtype=np.uint8)).save(good / "rgba.png")
    config = TrainConfig(image_size=64, epochs=1, batch_size=4, weights="offline", val_fraction=0.5)
    _, meta, _ = fit_category(root, category, config)
    skipped = meta.training["skipped_images"]
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    assert meta.training["train_images"] + meta.training["val_images"] == 7


@pytest.mark.parametrize("student", ["mirror", "reverse"])
def test_plain_training_separates_defects(synth_root, student):
    category = discover_categories(synth_root)[0]
    config = TrainConfig(image_size=64, epochs=20, batch_size=8, weights="offline", student=student)
    model, meta, _ = fit_category(synth_root, category, config)
    assert meta.threshold > 0 and meta.training["best_epoch"] >= 1
    samples = mvtec.test_samples(synth_root, category)
    images = torch.from_numpy(np.stack([load_image(s.path, 64) for s in samples])).permute(0, 3, 1, 2)
    _, scores = model.predict(images)
    auroc = image_auroc(np.array([s.label for s in samples]), scores.numpy())
    print(f"{category}, {student} student: image AUROC {auroc:.3f}")
    assert auroc >= 0.9


def test_the_same_seed_gives_the_same_model_whatever_threads_the_process_had(synth_root):
    """The training arithmetic runs on the recipe's threads (TrainConfig.threads), so a process that had 1 or
    3 threads (a worker that reserved 1 or 3 CPUs, a driver training in-process) writes the same student and
    the same threshold, bit for bit, and gets its own thread count back."""
    category = discover_categories(synth_root)[0]
    config = TrainConfig(image_size=64, epochs=3, batch_size=8, weights="offline", seed=5)
    before = torch.get_num_threads()
    fits = []
    try:
        for process_threads in (1, 3):
            torch.set_num_threads(process_threads)
            model, meta, _ = fit_category(synth_root, category, config)
            assert torch.get_num_threads() == process_threads
            fits.append((model.student.state_dict(), meta.threshold))
        # the recipe's own thread count does change the arithmetic (oneDNN and BatchNorm split their sums)
        model, meta, _ = fit_category(synth_root, category, replace(config, threads=1))
        fits.append((model.student.state_dict(), meta.threshold))
    finally:
        torch.set_num_threads(before)
    (one, threshold_one), (three, threshold_three), (other, _) = fits
    assert all(torch.equal(one[key], three[key]) for key in one) and threshold_one == threshold_three
    assert not all(torch.equal(one[key], other[key]) for key in one)


def test_sum_combination_is_calibrated_on_held_out_good_images(synth_root):
    category = discover_categories(synth_root)[0]
    config = TrainConfig(image_size=64, epochs=2, batch_size=8, weights="offline", combine="sum", memory_bank=0)
    model, meta, fitter = fit_category(synth_root, category, config)
    assert meta.combine == "sum" and len(meta.level_scales) == 3 and min(meta.level_scales) > 0
    maps, scores = model.predict(fitter.val_images)
    # every level divided by its mean on these very images: the combined map averages about 1 there
    assert maps.mean().item() == pytest.approx(1.0, rel=0.1)
    # the threshold is calibrated on these scores: never below their maximum (core.fit.calibration)
    assert meta.calibration["val_max"] == pytest.approx(float(scores.max()))
    assert meta.threshold >= float(scores.max()) - 1e-9


def test_every_rank_takes_the_same_number_of_steps_and_the_ranks_cover_the_epoch():
    """Data-parallel steps are collective: a rank with one step more hangs the group. Over many sizes, worker
    counts and batch sizes (41 images on 2 workers at batch 4 and bottle's 167 on 3 at 16 hung), every rank
    gets the same steps, together they see every image, and a single worker's batches are the plain order."""
    for n in range(1, 60):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        for world_size in range(1, 9):
            for batch_size in (1, 2, 3, 4, 7, 8, 16, 32):
                ranks = [rank_batches(order, rank, world_size, batch_size) for rank in range(world_size)]
                assert len({len(batches) for batches in ranks}) == 1, (n, world_size, batch_size)
                seen = torch.cat([torch.cat(batches) for batches in ranks])
                assert set(seen.tolist()) == set(range(n)) and len(seen) - n < world_size
    order = torch.randperm(41)
    assert [b.tolist() for b in rank_batches(order, 0, 1, 4)] == [b.tolist() for b in order.split(4)]
