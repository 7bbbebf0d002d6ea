"""The core scoring step and the Ray pipeline are one code path: same scores, same stored maps, bit for bit.

Scores the MVTec AD bottle test images from ``../shared`` (read in place) with a short-trained checkpoint,
once through :func:`stfpm_ray.core.score.score_batch` in this process and once through ``stfpm-ray score``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_scores

from stfpm_ray import cli
from stfpm_ray.core.checkpoint import save_checkpoint
from stfpm_ray.core.fit import TrainConfig, fit_category
from stfpm_ray.core.score import ScoreSettings, cpu_chunk, load_scoring_model, pixels_to_batch, score_batch
from stfpm_ray.data.images import load_image
from stfpm_ray.data.mvtec import test_samples as mvtec_test_samples

pytestmark = [pytest.mark.slow, pytest.mark.real_data]

BATCH = 4  # one CPU forward chunk per Ray batch, so both paths run the networks on the same groups of images


def test_score_batch_and_the_ray_pipeline_agree_on_bottle(ray_session, shared_bottle, tmp_path):
    config = TrainConfig(image_size=64, epochs=1, batch_size=16, weights="offline")
    model, meta, _ = fit_category(shared_bottle.parent, "bottle", config)
    save_checkpoint(tmp_path / "ckpt" / "bottle", model.student, meta, model.memory_bank)

    out = tmp_path / "scores"
    argv = [
        "score",
        "--checkpoints",
        str(tmp_path / "ckpt"),
        "--input",
        str(shared_bottle / "test"),
        "--out",
        str(out),
        "--score-batch-size",
        str(BATCH),
        "--precision",
        "fp32",
    ]
    assert cli.main(argv) == 0
    rows = read_scores(out).sort_values("path").reset_index(drop=True)

    paths = sorted(str(sample.path) for sample in mvtec_test_samples(shared_bottle.parent, "bottle"))
    assert rows.path.tolist() == paths and (rows.status == "ok").all()
    scorer, scorer_meta = load_scoring_model(str(tmp_path / "ckpt" / "bottle"))
    settings = ScoreSettings(map_size=128, precision="fp32", chunk=cpu_chunk("cpu", 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the scoring actor (--cpus-per-actor 1)
    try:
        direct = []
        for start in range(0, len(paths), BATCH):
            images = [load_image(path, meta.image_size) for path in paths[start : start + BATCH]]
            direct += score_batch(scorer, scorer_meta, pixels_to_batch(images, meta.image_size), settings)
    finally:
        torch.set_num_threads(threads)

    assert np.array_equal(rows.score.to_numpy(), np.array([d.score for d in direct], dtype=np.float32))
    assert rows.anomaly_map.tolist() == [d.anomaly_map for d in direct]
    assert np.array_equal(rows.map_scale.to_numpy(), np.array([d.map_scale for d in direct], dtype=np.float32))
    assert rows.is_anomalous.tolist() == [d.is_anomalous for d in direct]
    assert np.array_equal(rows.score_norm.to_numpy(), np.array([d.score_norm for d in direct], dtype=np.float32))
