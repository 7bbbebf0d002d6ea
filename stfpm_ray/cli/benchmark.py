"""``stfpm-ray benchmark``: train, score and evaluate every category (see :mod:`stfpm_ray.ray.benchmark`)."""

from __future__ import annotations

import argparse

from stfpm_ray.cli.options import (
    add_address,
    add_scoring_options,
    add_training_options,
    connect,
    scoring_options,
    train_config,
    train_resources,
)
from stfpm_ray.ray.benchmark import DEMO_TRAINING, run_benchmark



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="MVTec-layout root (default: generate a synthetic demo dataset in OUT/data)")
    parser.add_argument("--out", required=True, help="benchmark folder: checkpoints/, scores/, report/")
    parser.add_argument("--categories", default="all", help="comma-separated category names, or 'all' (default)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous benchmark in OUT")
    add_address(parser)
    add_training_options(parser, demo_defaults=DEMO_TRAINING)
    add_scoring_options(parser, batch_size_flag="--score-batch-size")


def run(args: argparse.Namespace) -> int:
    config = train_config(args, DEMO_TRAINING if args.data is None else None)
    resources, options = train_resources(args), scoring_options(args)
    connect(args)
    result = run_benchmark(args.data, args.out, config, resources, options, args.categories, args.overwrite)
    return 1 if result["failed"] else 0
