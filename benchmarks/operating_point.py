"""The deployed operating point, old threshold (maximum of validation scores) against the calibrated one.

For each category and seed: fit a student with the plain PyTorch core (:func:`stfpm_ray.core.fit.fit_category`),
score the labelled test split through the deployed scoring step (:func:`stfpm_ray.core.score.score_batch`,
networks rewritten for inference), and count at each threshold the false alarms on the good test images and
the detected defective ones. Both thresholds come from the same held-out good training images
(:func:`stfpm_ray.core.calibration.calibration`); test labels are read only here, to count. The second table pools
every fit of a dataset at other target false-alarm rates (``--far``), computed from the same validation
scores without refitting: the measurement behind ``TrainConfig.target_far``'s default.

The synthetic demo trains exactly as ``stfpm-ray benchmark`` does (DEMO_DATA, DEMO_TRAINING: 40 training
images, 8 held out); ``--demo-test`` only renders more test images (training images do not depend on it),
so that false-alarm rates are counted on more than 8 good images per category.

    python benchmarks/operating_point.py --mvtec ../shared/data/mvtec --mvtec-categories bottle,screw \\
        --demo-seeds 0,1,2,3,4 --demo-test 60 --far 0.05 --far 0.02 --far 0.005 --far 0.001
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from stfpm_ray.core.calibration import calibration
from stfpm_ray.core.fit import TrainConfig, fit_category, load_images, validation_scores
from stfpm_ray.core.score import ScoreSettings, cpu_chunk, score_batch
from stfpm_ray.data.mvtec import resolve_categories, test_samples
from stfpm_ray.data.synth import generate_dataset
from stfpm_ray.progress import fixed_width_table
from stfpm_ray.workflows.benchmark import DEMO_DATA, DEMO_TRAINING

COLUMNS = (
    "dataset",
    "category",
    "seed",
    "n val",
    "good/defect",
    "thr old",
    "thr new",
    "FAR old",
    "FAR new",
    "recall old",
    "recall new",
)
POOLED_COLUMNS = ("dataset", "threshold", "fits", "max binds", "FAR on good test", "recall")


@dataclass
class Fit:
    """One fitted category: its validation scores, deployed threshold and test scores by label."""

    dataset: str
    category: str
    seed: int
    threshold: float
    val: np.ndarray
    good: np.ndarray
    defective: np.ndarray


def _rate(hits: int, total: int) -> str:
    return f"{hits / total:.3f} ({hits}/{total})" if total else "–"


@torch.inference_mode()
def test_scores(model, meta, root: str, category: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of the test split, scored as the Ray actors score them."""
    samples = test_samples(root, category)
    images, _ = load_images([s.path for s in samples], size)
    scored = score_batch(model.for_inference(), meta, images, ScoreSettings(chunk=cpu_chunk("cpu", 1)))
    return np.array([s.score for s in scored]), np.array([s.label for s in samples])


def measure(dataset: str, root: str, category: str, config: TrainConfig) -> Fit:
    started = time.perf_counter()
    model, meta, fitter = fit_category(root, category, config)
    val = validation_scores(model, fitter.val_images, config.batch_size)  # before for_inference rewrites model
    scores, labels = test_scores(model, meta, root, category, meta.input_size)
    fit = Fit(dataset, category, config.seed, meta.threshold, val, scores[labels == 0], scores[labels == 1])
    print(fixed_width_table(COLUMNS, [_row(fit)]) + f"\n  ({time.perf_counter() - started:.0f} s)", flush=True)
    return fit


def _row(fit: Fit) -> tuple:
    old, new = fit.val.max(), fit.threshold
    return (
        fit.dataset,
        fit.category,
        fit.seed,
        fit.val.size,
        f"{fit.good.size}/{fit.defective.size}",
        f"{old:.4g}",
        f"{new:.4g}",
        _rate(int((fit.good > old).sum()), fit.good.size),
        _rate(int((fit.good > new).sum()), fit.good.size),
        _rate(int((fit.defective > old).sum()), fit.defective.size),
        _rate(int((fit.defective > new).sum()), fit.defective.size),
    )


def pooled(fits: list[Fit], fars: list[float]) -> list[tuple]:
    """Per dataset: false alarms and detections summed over its fits, at the maximum and at each target."""
    rows = []
    for dataset in dict.fromkeys(fit.dataset for fit in fits):
        chosen = [fit for fit in fits if fit.dataset == dataset]
        for far in [None, *fars]:
            thresholds = [fit.val.max() if far is None else calibration(fit.val, far)[0] for fit in chosen]
            binds = sum(t == fit.val.max() for t, fit in zip(thresholds, chosen))
            alarms = sum(int((fit.good > t).sum()) for t, fit in zip(thresholds, chosen))
            hits = sum(int((fit.defective > t).sum()) for t, fit in zip(thresholds, chosen))
            rows.append(
                (
                    dataset,
                    "max (old)" if far is None else f"target FAR {far:g}",
                    len(chosen),
                    binds,
                    _rate(alarms, sum(fit.good.size for fit in chosen)),
                    _rate(hits, sum(fit.defective.size for fit in chosen)),
                )
            )
    return rows


def _seeds(text: str) -> list[int]:
    return [int(seed) for seed in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mvtec", help="MVTec-layout root of real categories (read in place)")
    parser.add_argument("--mvtec-categories", default="bottle,screw")
    parser.add_argument("--mvtec-seeds", type=_seeds, default=[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs for --mvtec categories")
    parser.add_argument("--image-size", type=int, default=128, help="model input side for --mvtec categories")
    parser.add_argument("--demo-seeds", type=_seeds, default=[0], help="seeds of the demo fits; [] skips the demo")
    parser.add_argument("--demo-test", type=int, default=DEMO_DATA["n_test"], help="test images per demo category")
    parser.add_argument("--demo-epochs", type=int, default=DEMO_TRAINING["epochs"], help="epochs of the demo fits")
    parser.add_argument("--student", default=TrainConfig().student, help="student of every fit (mirror or reverse)")
    parser.add_argument("--far", type=float, action="append", default=[], help="extra target FARs to pool")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fars = sorted({TrainConfig().target_far, *args.far}, reverse=True)
    fits = []
    with tempfile.TemporaryDirectory() as scratch:
        runs = [
            (
                "mvtec",
                args.mvtec,
                args.mvtec_seeds,
                {"epochs": args.epochs, "image_size": args.image_size, "student": args.student},
            )
        ]
        if args.demo_seeds:
            generate_dataset(scratch, **{**DEMO_DATA, "n_test": args.demo_test})
            runs.append(
                (
                    "demo",
                    scratch,
                    args.demo_seeds,
                    {**DEMO_TRAINING, "epochs": args.demo_epochs, "student": args.student},
                )
            )
        for dataset, root, seeds, settings in runs:
            if root is None:
                continue
            names = resolve_categories(root, args.mvtec_categories if dataset == "mvtec" else "all")
            print(
                f"{dataset} ({root}): {', '.join(names)}; {settings}, seeds {seeds}, target FAR "
                f"{TrainConfig().target_far}",
                flush=True,
            )
            fits += [
                measure(dataset, root, name, TrainConfig(**settings, seed=seed)) for seed in seeds for name in names
            ]
    print(
        f"\nold: threshold = max of validation scores; new: target FAR {TrainConfig().target_far:g} (lognormal-t, "
        "never below the validation maximum). FAR on good test images, recall on defective ones."
    )
    print(fixed_width_table(COLUMNS, [_row(fit) for fit in fits], rule=True))
    print("\npooled over each dataset's fits, from the same validation scores")
    print(fixed_width_table(POOLED_COLUMNS, pooled(fits, fars), rule=True))


if __name__ == "__main__":
    main()
