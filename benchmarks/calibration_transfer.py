"""Which threshold keeps its promise on a later day? Calibrations compared on shifted copies of real test sets.

A nightly archive is captured after the training images, and any real line drifts in between (lighting,
camera, pose). For trained checkpoints (e.g. of ``stfpm-ray benchmark``) this script rebuilds each category's
held-out validation images (the checkpoint's own split), scores them and the labelled test split through the
deployed scoring path, and then, for each "later day" (the test images unchanged, or shifted in exposure,
scale or sensor noise), counts the false alarms on good images and the recall on defective ones at the
thresholds of several calibrations:

* ``lognormal-t``: the default (:func:`stfpm_ray.core.calibration.calibration`): a log-normal prediction bound
  from the validation scores, never below their k-th largest (the distribution-free bound at the target);
* ``max floor``: the default until 2026-12-07: the same bound, never below the largest validation score;
* ``robust``: the same bound with the median and the scaled median absolute deviation of the log scores, and
  no floor at the maximum, so that one outlying validation image does not set the threshold;
* ``val max``: the largest validation score;
* ``augmented``: the default bound, set from the validation images and four mild nuisance copies of each
  (exposure -8% and +8%, a 2.5% zoom, sensor noise of 3 grey levels), all milder than the days below;
* ``adaptive 5%`` and ``adaptive 33%``: an adaptive operating point (``stfpm-ray calibrate --adaptive``,
  :meth:`stfpm_ray.core.calibration.OperatingPoint.threshold_for`: the night's own median and robust spread)
  deciding a night that holds the day's good images and 5% (a third) as many defective ones as good;
* ``calibrate N``: ``stfpm-ray calibrate``'s threshold from N (``--recalibrate``) good images of the day, drawn
  ``--draws`` times at random; its false alarms are counted on the day's other good images, and the row gives
  the mean over the draws, the worst draw, and the share of draws within twice the target.

Test labels are read only here, to count.

    python benchmarks/calibration_transfer.py --checkpoints runs/real256/checkpoints --data ../shared/data/mvtec
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from stfpm_ray.core.calibration import calibration, later_point, new_point, robust_bound
from stfpm_ray.core.checkpoint import discover_checkpoints
from stfpm_ray.core.fit import split_train_val
from stfpm_ray.core.score import load_scoring_model
from stfpm_ray.data.images import load_image
from stfpm_ray.data.mvtec import test_samples, train_images
from stfpm_ray.progress import fixed_width_table

Shift = Callable[[np.ndarray, int], np.ndarray]


def _exposure(factor: float) -> Shift:
    return lambda image, _: np.clip(image.astype(np.float64) * factor + 0.5, 0, 255).astype(np.uint8)


def _zoom(factor: float) -> Shift:
    def shift(image: np.ndarray, _: int) -> np.ndarray:
        height, width = image.shape[:2]
        crop_h, crop_w = int(round(height / factor)), int(round(width / factor))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        inner = Image.fromarray(image[top : top + crop_h, left : left + crop_w])
        return np.asarray(inner.resize((width, height), Image.Resampling.BILINEAR))

    return shift


def _noise(sigma: float) -> Shift:
    def shift(image: np.ndarray, index: int) -> np.ndarray:
        noisy = image + np.random.default_rng(index).normal(0.0, sigma, image.shape)
        return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)

    return shift


DAYS: dict[str, Shift] = {
    "same day": lambda image, _: image,
    "exposure -15%": _exposure(0.85),
    "exposure +15%": _exposure(1.15),
    "zoom +5%": _zoom(1.05),
    "sensor noise 5": _noise(5.0),
}


AUGMENTATIONS: tuple[Shift, ...] = (_exposure(0.92), _exposure(1.08), _zoom(1.025), _noise(3.0))


def adaptive_threshold(val: np.ndarray, night: np.ndarray, target_far: float) -> float:
    """The threshold an adaptive operating point set from the validation scores gives the night."""
    return later_point(new_point(val, target_far, "validation", [], adaptive=True)).threshold_for(night)


def _scores(model, images: list[np.ndarray], shift: Shift) -> np.ndarray:
    batch = np.stack([shift(image, index) for index, image in enumerate(images)])
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2)
    chunks = [model.predict(tensor[i : i + 8])[1] for i in range(0, len(tensor), 8)]
    return torch.cat(chunks).numpy().astype(np.float64)


def _rate(flagged: np.ndarray) -> str:
    return f"{flagged.mean():.3f} ({int(flagged.sum())}/{flagged.size})"


def _recalibrated(good: np.ndarray, defective: np.ndarray, known_count: int, args: argparse.Namespace) -> tuple:
    """(mean threshold, false alarms over the draws, mean recall) of calibrate from a few good images of the day."""
    if known_count >= good.size:
        return "n/a", f"n/a: the day has {good.size} good images, none left to count", "n/a"
    rng = np.random.default_rng(args.seed)
    thresholds, far, recall = [], [], []
    for _ in range(args.draws):
        order = rng.permutation(good.size)
        known, rest = good[order[:known_count]], good[order[known_count:]]
        threshold = calibration(known, args.far)[0]
        thresholds.append(threshold)
        far.append(float((rest > threshold).mean()))
        recall.append(float((defective > threshold).mean()))
    within = np.mean(np.array(far) <= 2 * args.far)
    return (
        f"{np.mean(thresholds):.4g}",
        f"{np.mean(far):.3f} (worst {max(far):.3f}; {within:.0%} of draws <= 2x target)",
        f"{np.mean(recall):.3f}",
    )


def category_rows(root: str, name: str, folder: str, args: argparse.Namespace) -> list[tuple]:
    """One table row per (day, calibration) of one category."""
    model, meta = load_scoring_model(folder)
    size, training = meta.input_size, meta.training
    _, val_paths = split_train_val(train_images(root, name), training["val_fraction"], training["seed"])
    val_images = [load_image(p, size) for p in val_paths]
    val = _scores(model, val_images, DAYS["same day"])
    augmented = np.concatenate([val, *(_scores(model, val_images, shift) for shift in AUGMENTATIONS)])
    samples = test_samples(root, name)
    images = [load_image(s.path, size) for s in samples]
    labels = np.array([s.label for s in samples])
    target = args.far
    threshold, _, record = calibration(val, target)
    fixed = {
        "lognormal-t": threshold,
        "max floor": max(record.get("fitted_threshold", 0.0), float(val.max())),
        "robust": robust_bound(val, target),
        "val max": float(val.max()),
        "augmented": calibration(augmented, target)[0],
    }
    rows = []
    for day, shift in DAYS.items():
        scores = _scores(model, images, shift)
        good, defective = scores[labels == 0], scores[labels == 1]
        thresholds = dict(fixed)
        for share in (0.05, 1 / 3):
            night = np.concatenate([good, defective[: max(1, round(share * good.size))]])
            thresholds[f"adaptive {share:.0%}"] = adaptive_threshold(val, night, target)
        for method, threshold in thresholds.items():
            rows.append((name, day, method, f"{threshold:.4g}", _rate(good > threshold), _rate(defective > threshold)))
        for count in args.recalibrate:
            rows.append((name, day, f"calibrate {count}", *_recalibrated(good, defective, count, args)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", required=True, help="folder of <category>/ checkpoints")
    parser.add_argument("--data", required=True, help="the MVTec-layout root they were trained on")
    parser.add_argument("--far", type=float, default=0.05, help="target false-alarm rate")
    parser.add_argument(
        "--recalibrate", type=int, nargs="+", default=[10, 20], help="good images of the day given to calibrate"
    )
    parser.add_argument("--draws", type=int, default=50, help="random draws of the known good images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    found, problems = discover_checkpoints(args.checkpoints)
    rows = [row for name, (folder, _) in sorted(found.items()) for row in category_rows(args.data, name, folder, args)]
    print(fixed_width_table(("category", "day", "calibration", "threshold", "FAR on good", "recall"), rows, rule=True))
    for name, problem in problems.items():
        print(f"skipped {name}: {problem}")


if __name__ == "__main__":
    main()
