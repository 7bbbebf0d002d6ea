"""``stfpm-ray train``: one student per category with Ray Train (see :mod:`stfpm_ray.workflows.train`)."""

from __future__ import annotations

import argparse

from stfpm_ray.cli.flags import add_config_options, print_config
from stfpm_ray.cli.options import (
    add_address,
    add_resume_or_overwrite,
    add_training_options,
    connect,
    note_fresh_start,
    train_config,
    train_resources,
    training_values,
)
from stfpm_ray.data.mvtec import resolve_categories
from stfpm_ray.workflows.train import train_categories


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset root in MVTec AD layout (ROOT/<category>/train/good)")
    parser.add_argument("--categories", default="all", help="comma-separated category names, or 'all'")
    parser.add_argument(
        "--out", required=True, metavar="CKPT_DIR", help="checkpoint folder; one subfolder per category"
    )
    add_training_options(parser)
    add_address(parser)
    add_resume_or_overwrite(
        parser,
        resume_help="finish the run in CKPT_DIR: skip complete categories, resume the others "
        "(an empty or missing CKPT_DIR starts fresh)",
        overwrite_help="delete the run in CKPT_DIR and start afresh",
    )
    add_config_options(parser)


def run(args: argparse.Namespace) -> int:
    """Exit code 0 only if every category has a checkpoint."""
    config, resources = train_config(args), train_resources(args)
    if args.print_config:
        return print_config(args, training_values(config))
    categories = resolve_categories(args.data, args.categories)
    note_fresh_start(args)
    connect(args)
    results = train_categories(
        args.data, categories, args.out, config, resources, resume=args.resume, overwrite=args.overwrite
    )
    return 0 if all(r.ok for r in results) else 1
