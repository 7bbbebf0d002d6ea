"""``stfpm-ray train``: one student per category with Ray Train (see :mod:`stfpm_ray.ray.train`)."""

from __future__ import annotations

import argparse

from stfpm_ray.cli.options import add_address, add_training_options, connect, train_config, train_resources
from stfpm_ray.data.mvtec import resolve_categories
from stfpm_ray.ray.train import train_categories



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset root in MVTec AD layout (ROOT/<category>/train/good)")
    parser.add_argument("--categories", default="all", help="comma-separated category names, or 'all' (default)")
    parser.add_argument("--out", required=True, help="checkpoint folder CKPT_DIR; one subfolder per category")
    add_training_options(parser)
    add_address(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="finish the run in CKPT_DIR: skip complete categories, resume the others")
    mode.add_argument("--overwrite", action="store_true", help="delete the run in CKPT_DIR and start afresh")


def run(args: argparse.Namespace) -> int:
    """Exit code 0 only if every category has a checkpoint."""
    categories = resolve_categories(args.data, args.categories)
    config, resources = train_config(args), train_resources(args)
    connect(args)
    results = train_categories(args.data, categories, args.out, config, resources, resume=args.resume,
                               overwrite=args.overwrite)
    return 0 if all(r.ok for r in results) else 1
