"""``stfpm-ray synth OUT``: write a synthetic MVTec-layout dataset."""

from __future__ import annotations

import argparse

from stfpm_ray.data.synth import generate_dataset
from stfpm_ray.progress import log_progress



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="folder to write the MVTec-layout dataset into")
    parser.add_argument("--categories", type=int, default=3, help="number of categories (default 3; 15 like MVTec AD)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--train", type=int, default=40, help="defect-free training images per category (default 40)")
    parser.add_argument("--test", type=int, default=20, help="test images per category, ~40%% good (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")


def run(args: argparse.Namespace) -> int:
    names = generate_dataset(
        args.out, categories=args.categories, size=args.size, n_train=args.train, n_test=args.test,
        seed=args.seed, progress=log_progress,
    )
    log_progress(f"wrote {len(names)} categories to {args.out}: {', '.join(names)}")
    return 0
