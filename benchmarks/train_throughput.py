"""Training throughput of the Ray Train layer, measured side by side on one machine and the same data.

Figures:

* loop images/s: epochs x training images / time of the epoch loop (train, validate, checkpoint, final
  threshold and save; no start-up or decoding), for ``stfpm_ray.workflows.train`` (one category, one worker with
  one CPU) and for the core's fit recipe without Ray (``fit_category``, one torch thread). One thread
  each: on a machine shared with other work, multi-threaded torch slows down erratically;
* concurrency: wall time of ``train_categories`` for N categories at once (one worker with one CPU each)
  against that one category alone, start-up included, plus the same ratio for the loops alone.

Targets: Ray Train loop >= 0.9x plain loop; N categories <= 1.25x the wall time of one (N = CPUs). The
approaches run one after another, so load from other work skews single rounds by 10% or more; with
``--repeat R`` they alternate R times and each one's best time counts.

    python benchmarks/train_throughput.py                           # synthetic data, a few minutes
    python benchmarks/train_throughput.py --data ../shared/data/mvtec --categories bottle
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch

from stfpm_ray.core.checkpoint import save_checkpoint
from stfpm_ray.core.fit import TrainConfig, fit_category
from stfpm_ray.core.fit_report import CategoryResult
from stfpm_ray.data.mvtec import resolve_categories
from stfpm_ray.data.synth import generate_dataset
from stfpm_ray.progress import quiet
from stfpm_ray.ray.resources import TrainResources
from stfpm_ray.workflows.train import train_categories


def plain_loop(root: Path, category: str, config: TrainConfig, out: Path) -> tuple[float, int]:
    """The core fit recipe without Ray, timed over the same span as a Ray Train worker's: from the start of the
    epoch loop to the saved checkpoint (no start-up or decoding); (seconds, images)."""
    model, meta, fitter = fit_category(root, category, config)
    save_checkpoint(out / category, model.student, meta, model.memory_bank)
    return time.time() - fitter.started_at, config.epochs * len(fitter.train_images)


def ray_run(root: Path, categories: list[str], config: TrainConfig, out: Path) -> tuple[float, list[CategoryResult]]:
    """``train_categories`` with one one-CPU worker per category; (wall seconds, results)."""
    started = time.perf_counter()
    results = train_categories(root, categories, out, config, TrainResources(cpus_per_worker=1), progress=quiet)
    failed = [f"{r.category}: {r.error}" for r in results if not r.ok]
    if failed:
        raise SystemExit(f"training failed: {failed}")
    return time.perf_counter() - started, results


def loop_span(results: list[CategoryResult]) -> float:
    """From the first worker's loop start to the last one's final checkpoint."""
    return max(r.finished_at for r in results) - min(r.started_at for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="MVTec-layout root (default: synthetic categories)")
    parser.add_argument("--categories", default=None, help="comma-separated; default: the first N of --data")
    parser.add_argument("--concurrent", type=int, default=os.cpu_count(), help="N (default: CPU count)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-images", type=int, default=80, help="per synthetic category")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the best time of each approach counts")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    try:
        if args.data:
            root = Path(args.data).resolve()
            categories = resolve_categories(root, args.categories or "all")[: args.concurrent]
        else:
            root = work / "data"
            categories = generate_dataset(
                root, categories=args.concurrent, size=args.image_size, n_train=args.train_images, n_test=2, seed=0
            )
        if len(categories) < args.concurrent:
            raise SystemExit(f"need {args.concurrent} categories, found {categories}")
        config = TrainConfig(
            weights="offline", image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size
        )
        first = categories[0]
        print(
            f"machine: {cpus} CPUs, load average {os.getloadavg()[0]:.1f} at start; {args.image_size} px, "
            f"{args.epochs} epochs, batch {args.batch_size}, categories {categories}"
        )

        torch.set_num_threads(1)
        plain_s, many_s, alone_s = math.inf, math.inf, math.inf
        for round_ in range(args.repeat):
            (work / f"plain{round_}").mkdir()
            seconds, images = plain_loop(root, first, config, work / f"plain{round_}")
            plain_s = min(plain_s, seconds)
            # N at once runs first: it pays for the cold start of Ray's worker processes, if anyone does.
            seconds, results = ray_run(root, categories, config, work / f"many{round_}")
            if seconds < many_s:
                many_s, many = seconds, results
            seconds, results = ray_run(root, [first], config, work / f"alone{round_}")
            if seconds < alone_s:
                alone_s, alone = seconds, results
            print(f"round {round_ + 1} of {args.repeat} done (load average {os.getloadavg()[0]:.1f})", flush=True)
        if args.repeat > 1:
            print(f"figures are the best of {args.repeat} rounds per approach")
        ray_loop_s = loop_span(alone)
        print("loop images/s, one category, one CPU:")
        print(f"  plain PyTorch (fit_category)    {images / plain_s:8.2f}")
        print(f"  Ray Train worker                {images / ray_loop_s:8.2f}")
        n = len(categories)
        print("wall time, one CPU per category (start-up included; loop only in brackets):")
        print(f"  1 category alone                {alone_s:8.1f} s  ({loop_span(alone):.1f} s)")
        print(f"  {n} categories at once           {many_s:8.1f} s  ({loop_span(many):.1f} s)")
        first_start = min(r.started_at for r in many)
        for r in many:
            print(
                f"    {r.category:<12} loop {r.finished_at - r.started_at:6.1f} s, started "
                f"{r.started_at - first_start:4.1f} s after the first, {r.images_per_s:.1f} images/s"
            )
        print(f"load average {os.getloadavg()[0]:.1f} at end (other work on the machine skews every figure)")
        print(f"Ray Train / plain loop:          {(images / ray_loop_s) / (images / plain_s):.2f}x (target >= 0.9)")
        print(f"{n} at once / 1 alone, wall:      {many_s / alone_s:.2f}x (target <= 1.25)")
        print(f"{n} at once / 1 alone, loop:      {loop_span(many) / loop_span(alone):.2f}x")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
