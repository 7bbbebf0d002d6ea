"""``stfpm-ray benchmark``: train, score and evaluate every category (see :mod:`stfpm_ray.workflows.benchmark`)."""

from __future__ import annotations

import argparse

from stfpm_ray.cli.flags import add_config_options, print_config
from stfpm_ray.cli.options import (
    add_address,
    add_resume_or_overwrite,
    add_scoring_options,
    add_training_options,
    connect,
    note_fresh_start,
    scoring_options,
    train_config,
    train_resources,
    training_values,
)
from stfpm_ray.workflows.benchmark import DEMO_TRAINING, run_benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="MVTec-layout root (default: generate a synthetic demo dataset in OUT/data)")
    parser.add_argument("--out", required=True, metavar="DIR", help="benchmark folder: checkpoints/, scores/, report/")
    parser.add_argument("--categories", default="all", help="comma-separated category names, or 'all'")
    add_resume_or_overwrite(
        parser,
        resume_help="continue the benchmark in DIR: keep its data and finished categories, resume the "
        "others' training, then score and evaluate again",
        overwrite_help="replace the benchmark in DIR",
    )
    add_address(parser)
    add_training_options(parser, demo_defaults=DEMO_TRAINING)
    add_scoring_options(parser)
    add_config_options(parser)


def run(args: argparse.Namespace) -> int:
    config = train_config(args, DEMO_TRAINING if args.data is None else None)
    resources, options = train_resources(args), scoring_options(args)
    if args.print_config:
        return print_config(args, training_values(config))
    note_fresh_start(args)
    connect(args)
    result = run_benchmark(
        args.data, args.out, config, resources, options, args.categories, args.overwrite, resume=args.resume
    )
    return 1 if result["failed"] else 0
