"""The MVTec AD layout (stfpm_ray.data.mvtec): category discovery, routing of archive paths, missing data."""

from __future__ import annotations

import pytest

from stfpm_ray.data import mvtec
from stfpm_ray.data.mvtec import DatasetError, discover_categories, resolve_categories, sample_for, train_images


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
