"""Quality levers side by side: each variant of the training config fitted and scored on the same data in one run.

For every category and variant: image AUROC, pixel AUROC (maps and masks at the stored 128 px), the
best-validation epoch, training seconds and images/s, and scoring images/s (networks rewritten for inference,
the core's ``score_batch`` path). Model selection and threshold use only held-out good training images;
test labels are read only here, to report. A variant is ``NAME:field=value,...`` over the defaults of
``TrainConfig`` (``old:augment=none`` is the recipe before photometric augmentation). With ``--seeds 0,1,2``
every (category, variant) is fitted once per seed and a last table gives the mean and the spread (max - min)
over the seeds, and the seconds per epoch each variant costs.

    python benchmarks/ablation.py --data ../shared/data/mvtec --categories screw,bottle --epochs 20 \\
        --variant old:augment=none --variant new:
    python benchmarks/ablation.py --variant old:augment=none --variant new:     # the synthetic demo data
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stfpm_ray.core.anomaly_map import shrink_maps
from stfpm_ray.core.fit import TrainConfig, fit_category, load_images
from stfpm_ray.core.score import DEFAULT_MAP_SIZE
from stfpm_ray.data.images import load_mask
from stfpm_ray.data.mvtec import resolve_categories, test_samples
from stfpm_ray.data.synth import generate_dataset
from stfpm_ray.evaluate.metrics import PixelMetrics, image_auroc
from stfpm_ray.progress import fixed_width_table
from stfpm_ray.workflows.benchmark import DEMO_DATA, DEMO_TRAINING

COLUMNS = (
    "category",
    "variant",
    "seed",
    "image AUROC",
    "pixel AUROC",
    "best epoch",
    "train s",
    "train img/s",
    "score img/s",
)
SUMMARY = ("category", "variant", "seeds", "image AUROC mean", "spread", "pixel AUROC mean", "spread", "s/epoch")


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:field=value,...`` -> (name, TrainConfig overrides, typed like the field's default)."""
    name, _, assignments = text.partition(":")
    defaults = TrainConfig()
    overrides = {}
    for item in filter(None, assignments.split(",")):
        key, _, value = item.partition("=")
        kind = type(getattr(defaults, key))
        overrides[key] = tuple(int(v) for v in value.split("+")) if kind is tuple else kind(value)
    return name, overrides


@torch.inference_mode()
def test_quality(model, root: str, category: str, size: tuple[int, int]) -> tuple[float, float, float]:
    """(image AUROC, pixel AUROC, scoring images/s) of a fitted model on the category's labelled test split."""
    samples = test_samples(root, category)
    images, _ = load_images([s.path for s in samples], size)
    model = model.for_inference()
    started = time.perf_counter()
    maps, scores = zip(*(model.predict(images[i : i + 16]) for i in range(0, len(images), 16)))
    rate = len(images) / (time.perf_counter() - started)
    maps = shrink_maps(torch.cat(maps), DEFAULT_MAP_SIZE).numpy()
    pixels = PixelMetrics(max_score=float(maps.max()))
    for anomaly_map, sample in zip(maps, samples):
        pixels.update(anomaly_map, load_mask(sample.mask_path, anomaly_map.shape) if sample.mask_path else None)
    labels = np.array([s.label for s in samples])
    return image_auroc(labels, torch.cat(scores).numpy()), pixels.pixel_auroc(), rate


def run(
    root: str, categories: list[str], variants: list[tuple[str, dict]], base: dict, seeds: list[int]
) -> list[tuple]:
    rows = []
    for category in categories:
        for name, overrides in variants:
            for seed in seeds:
                config = TrainConfig(**{**base, **overrides, "seed": seed})
                started = time.perf_counter()
                model, meta, fitter = fit_category(root, category, config)
                seconds = time.perf_counter() - started
                image, pixel, score_rate = test_quality(model, root, category, meta.input_size)
                train_rate = config.epochs * len(fitter.train_images) / seconds
                rows.append(
                    (
                        category,
                        name,
                        seed,
                        f"{image:.3f}",
                        f"{pixel:.3f}",
                        meta.training["best_epoch"],
                        f"{seconds:.1f}",
                        f"{train_rate:.1f}",
                        f"{score_rate:.1f}",
                    )
                )
                print(fixed_width_table(COLUMNS, rows[-1:]), flush=True)
    return rows


def summary(rows: list[tuple], epochs: dict[str, int]) -> list[tuple]:
    """Per (category, variant): seeds, mean and spread (max - min) of both AUROCs, seconds per epoch."""
    groups: dict[tuple[str, str], list[tuple]] = {}
    for row in rows:
        groups.setdefault((row[0], row[1]), []).append(row)
    table = []
    for (category, name), runs in groups.items():
        image, pixel = (np.array([float(r[i]) for r in runs]) for i in (3, 4))
        per_epoch = np.mean([float(r[6]) for r in runs]) / epochs[name]
        table.append(
            (
                category,
                name,
                len(runs),
                f"{image.mean():.3f}",
                f"{np.ptp(image):.3f}",
                f"{pixel.mean():.3f}",
                f"{np.ptp(pixel):.3f}",
                f"{per_epoch:.2f}",
            )
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="MVTec-layout root (default: the synthetic demo data, generated)")
    parser.add_argument("--categories", default="all")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:field=value,...")
    parser.add_argument("--epochs", type=int, help="epochs (default: TrainConfig's, or the demo's without --data)")
    parser.add_argument("--image-size", type=int, help="model input side (default as --epochs)")
    parser.add_argument("--threads", type=int, default=TrainConfig().threads, help="training and scoring threads")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each variant fitted once per seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = {"weights": "auto", "threads": args.threads} if args.data else {**DEMO_TRAINING, "threads": args.threads}
    base.update({k: v for k, v in (("epochs", args.epochs), ("image_size", args.image_size)) if v is not None})
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data or str(Path(scratch) / "data")
        if not args.data:
            generate_dataset(root, **DEMO_DATA)
        variants = [parse_variant(v) for v in args.variant]
        seeds = [int(seed) for seed in args.seeds.split(",")]
        rows = run(root, resolve_categories(root, args.categories), variants, base, seeds)
    print("\nvariants: " + "; ".join(f"{name}: {overrides or 'defaults'}" for name, overrides in variants))
    print(f"base: {base}")
    print(fixed_width_table(COLUMNS, rows, rule=True))
    epochs = {name: TrainConfig(**{**base, **overrides}).epochs for name, overrides in variants}
    print(fixed_width_table(SUMMARY, summary(rows, epochs), rule=True))


if __name__ == "__main__":
    main()
