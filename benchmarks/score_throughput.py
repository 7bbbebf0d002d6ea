"""Scoring throughput, measured side by side on one machine and the same images.

Figures (images per second, whole runs including start-up):

* pipeline: ``stfpm_ray.ray_score.score_images``, files to committed Parquet;
* single process: a plain loop over the core, batch by batch (read, decode, resize, forward, area-resize
  and encode the maps), same batch size;
* seed approach: the seed notebook's evaluation loop (torch DataLoader with batch size 1, one full-size
  float map kept per image);
* decode-only ceiling: the pipeline's read-and-decode stage alone on every CPU (no model);
* model-only ceiling: forward and map encoding on pre-decoded tensors, torch on every CPU.

Targets on a 2-core machine: pipeline >= 0.8x single process, >= 3x seed, <= 40 KB of Parquet per image.

    python benchmarks/score_throughput.py                      # synthetic 768 px images
    python benchmarks/score_throughput.py --data ../shared/data/mvtec/bottle   # real images, repeated
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stfpm_ray import ray_score
from stfpm_ray.checkpoint import load_checkpoint, save_checkpoint
from stfpm_ray.fit import TrainConfig, fit_category
from stfpm_ray.images import load_image
from stfpm_ray.mapcodec import encode_map
from stfpm_ray.mvtec import discover_categories, test_samples
from stfpm_ray.synth import generate_dataset


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """A flat folder of ``--images`` test images (repeated as needed) and a 1-epoch checkpoint."""
    if args.data:
        root, category = Path(args.data).resolve().parent, Path(args.data).name
    else:
        root = work / "synth"
        category = generate_dataset(root, categories=1, size=args.synth_size, n_train=40, n_test=40, seed=0)[0]
    config = TrainConfig(image_size=args.image_size, epochs=1, batch_size=8, weights="offline")
    started = time.perf_counter()
    model, meta = fit_category(root, category, config)
    save_checkpoint(work / "ckpt" / category, model.student, meta)
    print(f"checkpoint: {category}, {args.image_size} px, 1 epoch in {time.perf_counter() - started:.0f} s")
    sources = [Path(s.path) for s in test_samples(root, category)]
    archive = work / "archive"
    archive.mkdir()
    for i in range(args.images):
        source = sources[i % len(sources)]
        os.symlink(source, archive / f"{i:05d}{source.suffix}")
    sizes = [p.stat().st_size for p in sources]
    print(f"images: {args.images} ({len(sources)} distinct {category} test images, mean {np.mean(sizes) / 1e3:.0f} KB)")
    return archive, work / "ckpt", category


def timed(label: str, count: int, run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    rate = count / (time.perf_counter() - started)
    print(f"  {label:<34} {rate:8.2f} images/s")
    return rate


def encode_maps(maps: torch.Tensor, map_size: int) -> list[bytes]:
    small = F.interpolate(maps.unsqueeze(1), size=(map_size, map_size), mode="area").squeeze(1)
    return [encode_map(m)[0] for m in small.numpy()]


def single_process(paths: list[Path], ckpt: Path, batch_size: int, map_size: int) -> None:
    model, meta = load_checkpoint(ckpt)
    for i in range(0, len(paths), batch_size):
        images = np.stack([load_image(p, meta.image_size) for p in paths[i : i + batch_size]])
        maps, _ = model.predict(torch.from_numpy(images).permute(0, 3, 1, 2))
        encode_maps(maps, map_size)


def seed_approach(paths: list[Path], ckpt: Path) -> None:
    """As the seed notebook evaluates: one image per step, a full-size float map kept for each."""
    model, meta = load_checkpoint(ckpt)

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.from_numpy(np.array(load_image(paths[index], meta.image_size))).permute(2, 0, 1)

    maps = []
    for image in torch.utils.data.DataLoader(Images(), batch_size=1, shuffle=False):
        anomaly_map, _ = model.predict(image)
        maps.append(anomaly_map[0].numpy())
    np.asarray(maps).reshape(len(maps), -1).max(axis=1)


def model_only(images: torch.Tensor, ckpt: Path, batch_size: int, map_size: int) -> None:
    model, _ = load_checkpoint(ckpt)
    for i in range(0, len(images), batch_size):
        maps, _ = model.predict(images[i : i + batch_size])
        encode_maps(maps, map_size)


def decode_only(archive: Path, ckpt_dir: Path, category: str, batch_size: int) -> None:
    files, sources = ray_score.list_images([str(archive)])
    planned, _ = ray_score.plan(files, ray_score.find_checkpoints(ckpt_dir), category, {})
    ray_score.decode_stage(planned, sources, batch_size).materialize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=240, help="images to score (test images repeated)")
    parser.add_argument("--data", help="an MVTec category folder (default: a synthetic one)")
    parser.add_argument("--synth-size", type=int, default=768, help="side of synthetic images in pixels")
    parser.add_argument("--image-size", type=int, default=256, help="model input size")
    parser.add_argument("--batch-size", type=int, default=ray_score.DEFAULT_BATCH_SIZE)
    parser.add_argument("--map-size", type=int, default=ray_score.DEFAULT_MAP_SIZE)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="as `stfpm-ray score --cpus-per-actor`")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="score-bench-"))
    try:
        archive, ckpt_dir, category = prepare(args, work)
        paths = sorted(archive.iterdir())
        n = len(paths)
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, "
              f"load average {os.getloadavg()[0]:.1f} at start")
        out = work / "out"
        rates = {
            "pipeline": timed("pipeline (files -> Parquet)", n, lambda: ray_score.score_images(
                ckpt_dir, str(archive), out, category=category, batch_size=args.batch_size,
                map_size=args.map_size, cpus_per_actor=args.cpus_per_actor, progress=lambda message: None,
            )),
            "single": timed("single process loop", n, lambda: single_process(
                paths, ckpt_dir / category, args.batch_size, args.map_size)),
            "seed": timed("seed approach (batch 1, float maps)", n, lambda: seed_approach(paths, ckpt_dir / category)),
            "decode": timed("decode-only ceiling (Ray tasks)", n, lambda: decode_only(
                archive, ckpt_dir, category, args.batch_size)),
        }
        decoded = torch.from_numpy(np.stack([load_image(p, args.image_size) for p in paths])).permute(0, 3, 1, 2)
        rates["model"] = timed("model-only ceiling (pre-decoded)", n, lambda: model_only(
            decoded, ckpt_dir / category, args.batch_size, args.map_size))
        parquet = sum(p.stat().st_size for p in out.glob("*.parquet"))
        print(f"load average {os.getloadavg()[0]:.1f} at end (other work on the machine skews every figure)")
        print(f"pipeline / single process:  {rates['pipeline'] / rates['single']:.2f}x (target >= 0.8)")
        print(f"pipeline / seed approach:   {rates['pipeline'] / rates['seed']:.2f}x (target >= 3)")
        print(f"pipeline / min(ceilings):   {rates['pipeline'] / min(rates['decode'], rates['model']):.2f}")
        print(f"Parquet bytes per image:    {parquet / n / 1e3:.1f} KB (target <= 40, maps included)")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
