"""One accelerator node, a few minutes: train a category at 256 px, score thousands of images, print figures.

Run through ``benchmarks/gpu_check.sh``. The steps use the core (no Ray needed: GPU images often lack it);
when Ray is importable, the Ray scoring pipeline runs on the same images as well.

1. train: ``fit_category`` on the device (teacher features cached, as ``stfpm-ray train`` does), wall time
   and images/s;
2. quality: ``precision_check.compare`` on the category's test images (image and pixel AUROC, score
   change and model-only speed of the networks as trained, rewritten for inference, and in bf16);
3. scoring of ``--images`` files (test images repeated):
   * decode-only ceiling: read + decode + resize in one process per CPU, no model;
   * model-only ceiling: forward + map + area resize to the stored map size on pre-decoded pinned batches;
   * core end to end: a torch DataLoader decoding in one worker per CPU (pinned batches) into the model,
     maps PNG-encoded as the pipeline stores them;
   * the Ray pipeline (files -> Parquet), when Ray is installed.

Target: end-to-end scoring >= 0.8x the decode-only ceiling of the node.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from precision_check import compare  # the sibling script (run as benchmarks/gpu_check.py)

from stfpm_ray.core.checkpoint import CheckpointMeta, save_checkpoint
from stfpm_ray.core.fit import TrainConfig, fit_category
from stfpm_ray.core.model import STFPM
from stfpm_ray.core.score import DEFAULT_MAP_SIZE as MAP_SIZE
from stfpm_ray.core.score import ScoreSettings, score_batch
from stfpm_ray.data.images import ImageDecodeError, load_image
from stfpm_ray.data.mvtec import test_samples
from stfpm_ray.data.synth import generate_dataset
from stfpm_ray.progress import quiet


class Files(torch.utils.data.Dataset):
    """Decoded images of a list of files, for DataLoader workers."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            return torch.from_numpy(np.array(load_image(self.paths[index], self.size))).permute(2, 0, 1)
        except ImageDecodeError:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8)


def rate(label: str, count: int, run: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    per_second = count / (time.perf_counter() - started)
    print(f"  {label:<58} {per_second:9.1f} images/s", flush=True)
    return per_second


def score_all(model: STFPM, meta: CheckpointMeta, batches, precision: str, device: str) -> None:
    """The core's scoring step on every batch (forward, map, PNG encoding, normalise, threshold)."""
    settings = ScoreSettings(map_size=MAP_SIZE, precision=precision)
    for batch in batches:
        score_batch(model, meta, batch.to(device, non_blocking=True), settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="MVTec-layout root (default: generate one synthetic category)")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=4000, help="files to score (test images repeated)")
    parser.add_argument("--batch-size", type=int, default=128, help="scoring batch size")
    args = parser.parse_args()

    device, size, batch, cpus = args.device, args.image_size, args.batch_size, os.cpu_count() or 1
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}; {cpus} CPUs; torch {torch.__version__}; image size {size}; scoring batch {batch}")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        root, category = (Path(args.data), args.category) if args.data else (work / "data", None)
        if category is None:
            category = generate_dataset(root, categories=1, size=768, n_train=200, n_test=60, seed=0)[0]
        if device == "cuda":
            torch.backends.cudnn.benchmark = True

        print(f"train: {category}, {args.epochs} epochs")
        started = time.perf_counter()
        config = TrainConfig(image_size=size, epochs=args.epochs, weights="offline")
        model, meta, _ = fit_category(root, category, config, device=device)
        seconds = time.perf_counter() - started
        images_seen = meta.training.get("train_images", 0) * args.epochs
        print(
            f"  wall {seconds:.0f} s (decode and teacher cache included); "
            f"best epoch {meta.training.get('best_epoch')}"
            + (f"; {images_seen / meta.training['seconds']:.0f} images/s in the epoch loop" if images_seen else "")
        )
        save_checkpoint(work / "ckpt" / category, model.student, meta)

        print("quality and model paths (test images):")
        compare(model, root, category, size, batch, device)  # leaves the model rewritten for inference

        sources = [Path(s.path).resolve() for s in test_samples(root, category)]
        paths = [sources[i % len(sources)] for i in range(args.images)]
        n = len(paths)
        print(f"scoring {n} files ({len(sources)} distinct):")
        with Pool(cpus) as pool:
            pool.starmap(load_image, [(p, size) for p in paths[:cpus]])  # start the workers
            decode = rate(
                f"decode-only ceiling ({cpus} processes)",
                n,
                lambda: pool.starmap(load_image, [(p, size) for p in paths], chunksize=16),
                device,
            )
        decoded = torch.from_numpy(np.stack([load_image(p, size) for p in sources])).permute(0, 3, 1, 2)
        decoded = decoded[torch.arange(n) % len(sources)].contiguous()
        batches = [decoded[i : i + batch] for i in range(0, n, batch)]
        if device == "cuda":
            batches = [b.pin_memory() for b in batches]
        results = {"decode": decode}
        for precision in ("fp32", "bf16"):
            results[f"model {precision}"] = rate(
                f"model-only ceiling, {precision} (forward + map + PNG)",
                n,
                lambda precision=precision: score_all(model, meta, batches, precision, device),
                device,
            )
        loader = torch.utils.data.DataLoader(
            Files(paths, size),
            batch_size=batch,
            num_workers=max(1, cpus - 1),
            pin_memory=device == "cuda",
            persistent_workers=True,
            prefetch_factor=4,
        )
        next(iter(loader))  # start the workers
        results["core"] = rate(
            "core end to end (DataLoader decode, bf16 model, PNG maps)",
            n,
            lambda: score_all(model, meta, loader, "bf16", device),
            device,
        )
        if importlib.util.find_spec("ray") is not None:
            from stfpm_ray.ray.pipeline import ScoringOptions  # optional on GPU images
            from stfpm_ray.workflows.score import score_images

            archive = work / "archive"
            archive.mkdir()
            for i, path in enumerate(paths):
                os.symlink(path, archive / f"{i:06d}{path.suffix}")
            gpus = 1.0 if device == "cuda" else 0.0
            results["pipeline"] = rate(
                "Ray pipeline (files -> Parquet)",
                n,
                lambda: score_images(
                    work / "ckpt",
                    str(archive),
                    work / "scores",
                    ScoringOptions(batch_size=batch, gpus_per_actor=gpus),
                    category=category,
                    progress=quiet,
                ),
                device,
            )
        else:
            print("  Ray pipeline: skipped, ray is not installed here")
        best = max(results.get("pipeline", 0.0), results["core"])
        print(f"end to end / decode-only ceiling: {best / decode:.2f} (target >= 0.8)")
        print(f"end to end / model-only ceiling (bf16): {best / results['model bf16']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
