"""No test label reaches training, model selection or calibration.

The same category is fitted twice: once as generated, once with its test labels shuffled (test images moved
between the good and defect folders, masks reassigned, one defect folder renamed). The student weights,
the chosen epoch, the threshold and the model id must come out identical, byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from stfpm_ray.core.checkpoint import save_checkpoint
from stfpm_ray.core.fit import TrainConfig, fit_category
from stfpm_ray.data.mvtec import discover_categories


def _shuffle_test_labels(category_dir: Path, seed: int) -> None:
    test_dir, masks_dir = category_dir / "test", category_dir / "ground_truth"
    images = sorted(test_dir.rglob("*.png"))
    folders = sorted({path.parent.name for path in images})
    rng = np.random.default_rng(seed)
    staged = category_dir / "_staged"
    staged.mkdir()
    for i, path in enumerate(images):
        path.rename(staged / f"{i:03d}.png")
    shutil.rmtree(test_dir)
    masks = sorted(masks_dir.rglob("*.png"))
    for i, path in enumerate(staged.iterdir()):
        folder = test_dir / folders[rng.integers(len(folders))]
        folder.mkdir(parents=True, exist_ok=True)
        path.rename(folder / f"{i:03d}.png")
        if folder.name != "good" and masks:
            (masks_dir / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(masks[rng.integers(len(masks))], masks_dir / folder.name / f"{i:03d}_mask.png")
    staged.rmdir()
    defect = next(p for p in sorted(test_dir.iterdir()) if p.name != "good")
    defect.rename(test_dir / "renamed_defect")


def _fit(root: Path, category: str, out: Path, augment: str, student: str) -> tuple[bytes, dict]:
    config = TrainConfig(
        image_size=64, epochs=3, batch_size=8, weights="offline", seed=5, augment=augment, student=student
    )
    result = fit_category(root, category, config)
    meta = save_checkpoint(out, result.model.student, result.meta, result.model.memory_bank)
    return (out / "student.safetensors").read_bytes(), meta


# with augmentation on, its random draws are part of what must not depend on the test split
@pytest.mark.parametrize(("augment", "student"), [("none", "mirror"), ("photometric", "mirror"), ("none", "reverse")])
def test_shuffled_test_labels_give_identical_checkpoints(synth_root, tmp_path, augment, student):
    category = discover_categories(synth_root)[0]
    shuffled = tmp_path / "shuffled"
    shutil.copytree(synth_root / category, shuffled / category)
    before = sorted(str(p.relative_to(shuffled)) for p in (shuffled / category / "test").rglob("*.png"))
    _shuffle_test_labels(shuffled / category, seed=1)
    after = sorted(str(p.relative_to(shuffled)) for p in (shuffled / category / "test").rglob("*.png"))
    assert before != after  # the labels really moved

    weights, meta = _fit(synth_root, category, tmp_path / "ckpt-original", augment, student)
    weights_shuffled, meta_shuffled = _fit(shuffled, category, tmp_path / "ckpt-shuffled", augment, student)
    assert (meta.training["augment"], meta.student) == (augment, student)
    assert weights == weights_shuffled
    assert meta.threshold == meta_shuffled.threshold
    assert meta.training["best_epoch"] == meta_shuffled.training["best_epoch"]
    assert meta.model_id == meta_shuffled.model_id
