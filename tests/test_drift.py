"""Whether an operating point held (stfpm_ray.evaluate.drift), on score distributions with known answers."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from stfpm_ray.core.calibration import OperatingPoint, calibration
from stfpm_ray.evaluate.drift import MIN_IMAGES, assess, drift_line, run_drift


def _point(rng: np.random.Generator, n: int = 40, target: float = 0.05) -> OperatingPoint:
    """An operating point set from ``n`` good scores drawn from the good distribution of the tests."""
    scores = rng.lognormal(mean=-2.0, sigma=0.2, size=n)
    threshold, _, record = calibration(scores, target)
    return OperatingPoint("training", threshold, target, record["method"], "training", scores=tuple(scores))


def _good(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    return rng.lognormal(mean=-2.0 + shift, sigma=0.2, size=n)


def test_a_night_like_the_calibration_keeps_its_operating_point():
    rng = np.random.default_rng(0)
    point = _point(rng)
    night = np.concatenate([_good(rng, 500), rng.lognormal(-0.5, 0.2, 10)])  # 2% defects, scoring far higher
    result = assess(night, None, point)
    assert not result["detected"] and result["basis"] == "all images"
    assert 0.8 < result["median_ratio"] < 1.25 and result["ks_p_value"] > 0.001


def test_a_night_whose_good_images_all_moved_breaks_it_with_or_without_labels():
    rng = np.random.default_rng(1)
    point = _point(rng)
    good, defective = _good(rng, 200, shift=0.6), rng.lognormal(0.0, 0.2, 8)
    unlabelled = assess(np.concatenate([good, defective]), None, point)
    assert unlabelled["detected"] and unlabelled["bulk_moved"] and unlabelled["rate"] > 0.5
    assert unlabelled["median_ratio"] == pytest.approx(math.exp(0.6), rel=0.15) and unlabelled["ks_p_value"] < 1e-6
    labels = np.r_[np.zeros(good.size), np.ones(defective.size)]
    labelled = assess(np.concatenate([good, defective]), labels, point)
    assert labelled["detected"] and labelled["basis"] == "labelled good images" and labelled["n"] == 200
    assert "labelled good images" in labelled["reason"] and "target 5.0%" in labelled["reason"]


def test_a_burst_of_defects_raises_the_flag_rate_but_is_not_called_drift():
    rng = np.random.default_rng(2)
    point = _point(rng)
    night = np.concatenate([_good(rng, 300), rng.lognormal(0.0, 0.2, 60)])  # 17% defective tonight
    result = assess(night, None, point)
    assert result["rate"] > 2 * point.target_far and result["p_value"] < 0.01  # the flag rate alone would cry wolf
    assert not result["bulk_moved"] and not result["detected"]


def test_labelled_good_images_on_target_keep_it_even_when_most_images_are_defective():
    rng = np.random.default_rng(3)
    point = _point(rng)
    good, defective = _good(rng, 40), rng.lognormal(0.0, 0.2, 120)
    labels = np.r_[np.zeros(good.size), np.ones(defective.size)]
    result = assess(np.concatenate([good, defective]), labels, point)
    assert result["basis"] == "labelled good images" and not result["detected"]


def test_too_few_images_or_no_target_decide_nothing():
    rng = np.random.default_rng(4)
    point = _point(rng)
    few = assess(_good(rng, MIN_IMAGES - 1, shift=2.0), None, point)
    assert not few["detected"] and "too few images" in few["reason"]
    old = OperatingPoint("training", point.threshold, math.nan, "max", "training")  # a checkpoint before records
    result = assess(_good(rng, 100, shift=2.0), None, old)
    assert not result["detected"] and "no target" in result["reason"] and math.isnan(result["median_ratio"])


def test_a_run_is_judged_per_category_on_its_ok_rows_and_the_line_says_what_to_do():
    rng = np.random.default_rng(5)
    point = _point(rng)
    moved, steady = _good(rng, 50, shift=0.8), _good(rng, 50)
    rows = pa.table(
        {
            "category": ["a"] * 50 + ["b"] * 50 + ["b", "c"],
            "score": np.r_[moved, steady, [np.nan, 1.0]],
            "label": pa.nulls(102, pa.int8()),
            "status": ["ok"] * 100 + ["error", "ok"],
        }
    )
    found = run_drift(rows, {"a": point, "b": point})
    assert sorted(found) == ["a", "b"] and found["a"]["detected"] and not found["b"]["detected"]
    assert found["b"]["n"] == 50  # the error row does not count
    line = drift_line("a", found["a"], "/ckpt")
    assert line.startswith("a: the operating point (training) no longer holds: all images: ")
    assert "stfpm-ray calibrate --checkpoints /ckpt --category a --good FOLDER" in line and "\n" not in line


def test_with_labels_only_good_images_are_judged_and_too_few_of_them_decide_nothing():
    rng = np.random.default_rng(6)
    point = _point(rng)
    good, defective = _good(rng, MIN_IMAGES - 1), rng.lognormal(0.0, 0.2, 30)  # a small test split, mostly defects
    result = assess(np.concatenate([good, defective]), np.r_[np.zeros(good.size), np.ones(defective.size)], point)
    assert result["basis"] == "labelled good images" and not result["detected"] and "too few" in result["reason"]
