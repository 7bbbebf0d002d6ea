"""jobs/nightly.py (stfpm-ray nightly): incremental rescoring plus a per-category report of exactly this run's
new anomalies."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import read_scores
from deltalake import DeltaTable
from PIL import Image

from stfpm_ray.core.checkpoint import save_checkpoint
from stfpm_ray.core.fit import TrainConfig, fit_category
from stfpm_ray.data.images import load_image
from stfpm_ray.data.mvtec import discover_categories

JOB = Path(__file__).resolve().parents[1] / "jobs" / "nightly.py"
QUIET = lambda message: None  # noqa: E731


def _load_job():
    spec = importlib.util.spec_from_file_location("nightly_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scores(model, paths: list[Path]) -> np.ndarray:
    images = torch.from_numpy(np.stack([load_image(p, 64) for p in paths])).permute(0, 3, 1, 2).contiguous()
    return model.predict(images)[1].numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth_root):
    """A one-epoch checkpoint of the first synthetic category, a copy of its test split as the archive, and a
    noise image for the next night.

    One epoch does not make a model whose own threshold separates anything, so the checkpoint's threshold is
    set from the images themselves: half of the first night's images, and the noise image, lie above it.
    """
    category = discover_categories(synth_root)[0]
    base = tmp_path_factory.mktemp("nightly")
    model, meta, _ = fit_category(
        synth_root, category, TrainConfig(image_size=64, epochs=1, batch_size=8, weights="offline")
    )
    archive = base / "archive"
    shutil.copytree(synth_root / category / "test", archive / category / "test")
    noise = base / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    first_night = _scores(model, sorted(archive.rglob("*.png")))
    meta.threshold = 0.99 * min(float(np.median(first_night)), float(_scores(model, [noise])[0]))
    save_checkpoint(base / "ckpt" / category, model.student, meta, model.memory_bank)
    return _load_job(), category, base / "ckpt", archive, base / "scores", noise


def _run_rows(out: Path, report: dict) -> pd.DataFrame:
    """The rows of one run, read independently of the report: the table version it committed, its run_id."""
    frame = DeltaTable(str(out), version=report["version"]).to_pandas()
    return frame[frame.run_id == report["run_id"]]


def test_nightly_reports_only_this_runs_new_anomalies(ray_session, setup):
    job, category, checkpoints, archive, out, noise = setup
    first, path = job.nightly(checkpoints, str(archive), str(out), progress=QUIET)
    n_images = len(list(archive.rglob("*.png")))
    entry = first["categories"][category]
    assert (first["scored"], entry["skipped"], entry["errors"]) == (n_images, 0, 0)
    rows = _run_rows(out, first)
    anomalous = rows[rows.is_anomalous.astype(bool)].sort_values("score_norm", ascending=False)
    assert 0 < len(anomalous) < n_images
    assert [r["path"] for r in entry["anomalies"]] == list(anomalous.path)
    assert entry["anomalous"] == len(anomalous)
    assert json.loads(Path(path).read_text()) == first
    assert Path(path).parent == out / "_reports" and path.endswith(f"nightly-{first['run_id']}.json")

    # The next night two images arrive: noise (above the threshold) and a copy of a known image.
    good = archive / category / "test" / "good"
    shutil.copy(noise, good / "night2_noise.png")
    shutil.copy(sorted(good.glob("*.png"))[0], good / "night2_copy.png")
    argv = ["--checkpoints", str(checkpoints), "--input", str(archive), "--out", str(out), "--top", "1"]
    assert job.main(argv) == 0
    reports = [json.loads(p.read_text()) for p in (out / "_reports").glob("nightly-*.json")]
    assert len(reports) == 2
    second = next(r for r in reports if r["run_id"] != first["run_id"])
    entry = second["categories"][category]
    assert (second["scored"], entry["skipped"]) == (2, n_images)
    rows = _run_rows(out, second)
    assert set(rows.path) == {str(good / "night2_noise.png"), str(good / "night2_copy.png")}
    assert entry["anomalous"] == int(rows.is_anomalous.sum()) >= 1
    top = rows[rows.is_anomalous.astype(bool)].sort_values("score_norm", ascending=False).path.iloc[0]
    assert [r["path"] for r in entry["anomalies"]] == [top]  # --top 1: only the most anomalous is listed
    assert len(read_scores(out)) == n_images + 2  # incremental: nothing was scored twice

    quiet_night, path = job.nightly(checkpoints, str(archive), str(out), progress=QUIET)
    assert (quiet_night["version"], quiet_night["scored"], quiet_night["new_anomalies"]) == (None, 0, 0)
    assert quiet_night["categories"][category]["skipped"] == n_images + 2 and Path(path).is_file()


def test_nightly_refuses_overwrite(setup, capsys):
    job, _, checkpoints, archive, out, _ = setup
    assert job.main(["--checkpoints", str(checkpoints), "--input", str(archive), "--out", str(out), "--overwrite"]) == 2
    assert "incremental" in capsys.readouterr().err
