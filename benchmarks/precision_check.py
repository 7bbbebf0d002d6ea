"""Scores and speed of the inference paths of one trained checkpoint, side by side on its MVTec test images.

Paths: the networks as trained (fp32), the inference rewrite (``STFPM.for_inference``: BatchNorm folded,
unused blocks dropped) in fp32, and the rewrite under bf16 autocast. For each: image AUROC, pixel AUROC
(full-size maps against the ground-truth masks), the largest and mean relative deviation of image scores
from the as-trained fp32 ones, and model-only images/s (forward + map, images already decoded).

Targets: the rewrite changes scores by < 1e-4 relative; bf16 leaves both AUROCs within 0.001.

    python benchmarks/precision_check.py --checkpoint CKPT_DIR/bottle --data ../shared/data/mvtec
    python benchmarks/precision_check.py --checkpoint CKPT_DIR/bottle --data DATA --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from stfpm_ray.core.checkpoint import load_checkpoint
from stfpm_ray.core.model import STFPM
from stfpm_ray.data.images import load_image, load_mask
from stfpm_ray.data.mvtec import test_samples


def run(
    model: STFPM, images: torch.Tensor, batch_size: int, precision: str, device: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """Maps and scores of every image, and images/s of the best of two passes."""
    best = float("inf")
    for _ in range(2):
        maps, scores = [], []
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            batch_maps, batch_scores = model.predict(images[start : start + batch_size].to(device), precision)
            maps.append(batch_maps.cpu())
            scores.append(batch_scores.cpu())
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return torch.cat(maps).numpy(), torch.cat(scores).numpy(), len(images) / best


def compare(
    model: STFPM, root: str | Path, category: str, size: tuple[int, int], batch_size: int, device: str
) -> dict[str, dict[str, float]]:
    """Print the table of the three paths on the category's test images and return its rows (path ->
    image_auroc, pixel_auroc, max_dev, mean_dev, images_per_s); leaves ``model`` rewritten."""
    samples = test_samples(root, category)
    images = torch.from_numpy(np.stack([load_image(s.path, size) for s in samples])).permute(0, 3, 1, 2)
    labels = np.array([s.label for s in samples])
    masks = np.stack([load_mask(s.mask_path, size) for s in samples]).ravel()
    print(
        f"{category}: {len(samples)} test images at {size[0]}x{size[1]} px, device {device}, "
        f"batch {batch_size}, torch {torch.get_num_threads()} threads"
    )

    as_trained = run(model.eval(), images, batch_size, "fp32", device)
    model.for_inference()
    paths = {
        "fp32 as trained": as_trained,
        "fp32 rewritten": run(model, images, batch_size, "fp32", device),
        "bf16 rewritten": run(model, images, batch_size, "bf16", device),
    }
    reference = as_trained[1]
    print(f"{'path':<18} {'image AUROC':>11} {'pixel AUROC':>11} {'max dev':>9} {'mean dev':>9} {'images/s':>9}")
    rows = {}
    for name, (maps, scores, rate) in paths.items():
        deviation = np.abs(scores - reference) / np.abs(reference)
        rows[name] = {
            "image_auroc": roc_auc_score(labels, scores),
            "pixel_auroc": roc_auc_score(masks, maps.ravel()),
            "max_dev": float(deviation.max()),
            "mean_dev": float(deviation.mean()),
            "images_per_s": rate,
        }
        row = rows[name]
        print(
            f"{name:<18} {row['image_auroc']:>11.4f} {row['pixel_auroc']:>11.4f} "
            f"{row['max_dev']:>9.1e} {row['mean_dev']:>9.1e} {rate:>9.1f}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="one category's checkpoint folder")
    parser.add_argument("--data", required=True, help="MVTec-layout root holding that category")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward (default 4: CPU)")
    args = parser.parse_args()

    model, meta = load_checkpoint(args.checkpoint, device=args.device)
    compare(model, args.data, meta.category, meta.input_size, args.batch_size, args.device)


if __name__ == "__main__":
    main()
