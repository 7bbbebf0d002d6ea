"""MVTec layout discovery, routing of archive paths, and the plain training loop on synthetic data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stfpm_ray.core.fit import TrainConfig, fit_category, split_train_val
from stfpm_ray.data import mvtec
from stfpm_ray.data.images import load_image
from stfpm_ray.data.mvtec import DatasetError, discover_categories, resolve_categories, sample_for, train_images
from stfpm_ray.evaluate.metrics import image_auroc


def test_discovery_and_routing(synth_root):
    categories = discover_categories(synth_root)
    assert len(categories) == 3
    assert resolve_categories(synth_root, "all") == categories
    with pytest.raises(DatasetError, match="not found"):
        resolve_categories(synth_root, "nope")
    samples = mvtec.test_samples(synth_root, categories[0])
    assert {s.label for s in samples} == {0, 1}
    for s in samples:
        assert (s.mask_path is None) == (s.label == 0)
        assert s.category == categories[0]
    train = sample_for(train_images(synth_root, categories[0])[0])
    assert train.category == categories[0] and train.label is None
    assert sample_for("/archive/line3/img.png").category == "line3"
    assert sample_for("/archive/line3/img.png", category="bottle").category == "bottle"


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        discover_categories(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no categories"):
        discover_categories(tmp_path)
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images"):
        train_images(tmp_path, "empty")


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
    for path in train_images(synth_root, category)[:6]:
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


def test_sum_combination_is_calibrated_on_held_out_good_images(synth_root):
    category = discover_categories(synth_root)[0]
    config = TrainConfig(image_size=64, epochs=2, batch_size=8, weights="offline", combine="sum")
    model, meta, fitter = fit_category(synth_root, category, config)
    assert meta.combine == "sum" and len(meta.level_scales) == 3 and min(meta.level_scales) > 0
    maps, scores = model.predict(fitter.val_images)
    # every level divided by its mean on these very images: the combined map averages about 1 there
    assert maps.mean().item() == pytest.approx(1.0, rel=0.1)
    # the threshold is calibrated on these scores: never below their maximum (core.fit.calibration)
    assert meta.calibration["val_max"] == pytest.approx(float(scores.max()))
    assert meta.threshold >= float(scores.max()) - 1e-9
