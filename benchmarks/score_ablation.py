"""Score-time levers on trained models: how the anomaly map is made and reduced, compared without retraining.

Teacher and student are fixed after training; what turns their feature distances into a map and a score is
not. This benchmark computes every test image's per-level distances once per checkpoint of finished
``stfpm-ray benchmark`` folders, then compares, for each: the combination of the levels (``product``, the
default, or the calibrated ``sum``, its scales measured on the run's own held-out good images), which levels
take part, the Gaussian smoothing (none, the default ``image_size / 64``, twice that) and the image score (the
map's maximum, the default, or the mean of its top 0.1% / 1% pixels). It prints image and pixel AUROC per
folder and the mean and spread over folders of the same category (seeds), so a lever is kept only where it
helps across categories and seeds.

    python benchmarks/score_ablation.py runs/seeds/mvtec_s0 runs/seeds/screw_s1 runs/seeds/screw_s2 \\
        runs/seeds/elpv_s0
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stfpm_ray.core.anomaly_map import (
    combine_levels,
    default_map_sigma,
    image_scores,
    level_distances,
    shrink_maps,
    smooth_maps,
    stored_map_size,
)
from stfpm_ray.core.checkpoint import discover_checkpoints, load_checkpoint
from stfpm_ray.core.fit import load_images, split_train_val
from stfpm_ray.core.score import DEFAULT_MAP_SIZE
from stfpm_ray.data.images import load_mask
from stfpm_ray.data.mvtec import test_samples, train_images
from stfpm_ray.evaluate.metrics import PixelMetrics, image_auroc
from stfpm_ray.progress import fixed_width_table

BATCH = 16
COLUMNS = ("category", "run", "combine", "levels", "sigma", "image score", "image AUROC", "pixel AUROC")
SUMMARY = ("category", "combine", "levels", "sigma", "image score", "runs", "image AUROC mean", "spread", "pixel mean")


def top_fraction_mean(fraction: float) -> Callable[[Tensor], Tensor]:
    """Image score: the mean of the map's highest ``fraction`` of pixels (a defect's area, not one pixel)."""

    def score(maps: Tensor) -> Tensor:
        flat = maps.flatten(1)
        return flat.topk(max(1, int(fraction * flat.shape[1])), dim=1).values.mean(dim=1)

    return score


IMAGE_SCORES = {"max": image_scores, "top 0.1%": top_fraction_mean(0.001), "top 1%": top_fraction_mean(0.01)}


@torch.inference_mode()
def distances(model, paths: Sequence[str], size: tuple[int, int]) -> list[Tensor]:
    """Per-level distance maps of ``paths`` at each level's resolution, float32."""
    batches = [level_distances(*model(_images(paths[i : i + BATCH], size))) for i in range(0, len(paths), BATCH)]
    return [torch.cat(level) for level in zip(*batches)]


def _images(paths: Sequence[str], size: tuple[int, int]) -> Tensor:
    images, problems = load_images(paths, size)
    if problems:
        raise SystemExit(f"cannot read images: {problems}")
    return images


def level_subsets(count: int) -> dict[str, tuple[int, ...]]:
    """All levels, and every subset that drops the first or the last level."""
    subsets = {"all": tuple(range(count))}
    if count > 1:
        subsets["no first"] = tuple(range(1, count))
        subsets["no last"] = tuple(range(count - 1))
    return subsets


def category_rows(folder: Path, data: str, seed: int, val_fraction: float, checkpoint: str) -> list[tuple]:
    """Every variant's image and pixel AUROC for one trained category of a benchmark folder."""
    model, meta = load_checkpoint(checkpoint)
    model = model.for_inference()
    category, size = meta.category, meta.input_size
    samples = test_samples(data, category)
    _, held_out = split_train_val(train_images(data, category), val_fraction, seed)
    test = distances(model, [s.path for s in samples], size)
    scales = model.mean_level_distances(_images(held_out, size), BATCH)  # as training measures them for --combine sum
    labels = np.array([s.label for s in samples])
    map_shape = stored_map_size(size, DEFAULT_MAP_SIZE)  # as score stores maps
    masks = [load_mask(s.mask_path, map_shape) if s.mask_path else None for s in samples]
    default_sigma = default_map_sigma(meta.image_size)
    rows = []
    for combine, (levels_name, levels), sigma in itertools.product(
        ("product", "sum"), level_subsets(len(test)).items(), (0.0, default_sigma, 2 * default_sigma)
    ):
        chosen_scales = [scales[i] for i in levels] if combine == "sum" else None
        maps = smooth_maps(combine_levels([test[i] for i in levels], size, chosen_scales), sigma)
        pixel = pixel_auroc(maps, masks)
        for score_name, score in IMAGE_SCORES.items():
            image = image_auroc(labels, score(maps).numpy())
            rows.append(
                (category, folder.name, combine, levels_name, f"{sigma:g}", score_name, f"{image:.4f}", f"{pixel:.4f}")
            )
    return rows


def pixel_auroc(maps: Tensor, masks: Sequence) -> float:
    """Pixel AUROC of full-size maps as ``evaluate`` measures it (on stored maps); NaN without masks."""
    if all(mask is None for mask in masks):
        return float("nan")
    stored = shrink_maps(maps, DEFAULT_MAP_SIZE).numpy()
    metrics = PixelMetrics(max_score=float(stored.max()))
    for anomaly_map, mask in zip(stored, masks):
        metrics.update(anomaly_map, mask)
    return metrics.pixel_auroc()


def finished_runs(folders: Sequence[Path]) -> Iterator[tuple[Path, dict, str]]:
    """(folder, its benchmark.json, checkpoint folder) for every trained category of finished benchmark folders."""
    for folder in folders:
        record = json.loads((folder / "benchmark.json").read_text())
        valid, problems = discover_checkpoints(folder / "checkpoints")
        if problems:
            raise SystemExit(f"{folder}: unusable checkpoints: {problems}")
        for checkpoint, _ in valid.values():
            yield folder, record, checkpoint


def summary(rows: list[tuple]) -> list[tuple]:
    """Per (category, variant): runs, mean and spread (max - min) of image AUROC, mean pixel AUROC."""
    groups: dict[tuple, list[tuple]] = {}
    for row in rows:
        groups.setdefault((row[0], *row[2:6]), []).append(row)
    table = []
    for key, runs in groups.items():
        image = np.array([float(r[6]) for r in runs])
        pixel = np.array([float(r[7]) for r in runs])
        pixel_mean = f"{pixel.mean():.4f}" if not np.isnan(pixel).all() else "-"
        table.append((*key, len(runs), f"{image.mean():.4f}", f"{np.ptp(image):.4f}", pixel_mean))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="finished `stfpm-ray benchmark` folders (--out)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for folder, record, checkpoint in finished_runs(args.folders):
        config = record["config"]
        found = category_rows(folder, record["data"], config["seed"], config["val_fraction"], checkpoint)
        print(fixed_width_table(COLUMNS, found), flush=True)
        rows += found
    print(fixed_width_table(SUMMARY, summary(rows), rule=True))


if __name__ == "__main__":
    main()
