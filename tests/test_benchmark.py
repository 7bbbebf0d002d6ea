"""The benchmark command end to end: 15 synthetic categories trained, scored and evaluated."""

from __future__ import annotations

import json

import pytest

from stfpm_ray import cli
from stfpm_ray.data.synth import generate_dataset

pytestmark = pytest.mark.slow


def test_benchmark_on_fifteen_synthetic_categories(ray_session, tmp_path):
    data = tmp_path / "data"
    names = generate_dataset(data, categories=15, size=64, n_train=6, n_test=4, seed=3)
    out = tmp_path / "run"
    code = cli.main(
        [
            "benchmark",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--image-size",
            "64",
            "--batch-size",
            "4",
            "--score-batch-size",
            "16",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert sorted(metrics["categories"]) == sorted(names)
    for name in names:
        entry = metrics["categories"][name]
        assert entry["n_images"] == 4 and entry["n_errors"] == 0
        assert entry["n_good"] + entry["n_defective"] == 4 and entry["model_id"]
        # a metric of every category was computed from its rows (a NaN or a missing key fails here)
        assert 0.0 <= entry["pixel_auroc"] <= 1.0 and 0.0 <= entry["image_auroc"] <= 1.0
    assert (out / "report" / "report.html").stat().st_size > 10_000
    summary = json.loads((out / "benchmark.json").read_text())
    assert summary["failed"] == [] and summary["stages"]["train_s"] > 0
    # a second run into the same folder refuses instead of mixing two runs
    assert cli.main(["benchmark", "--data", str(data), "--out", str(out), "--epochs", "1"]) == 2
