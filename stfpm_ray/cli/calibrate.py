"""``stfpm-ray calibrate``: a new operating point from known-good images, no retraining (see
:mod:`stfpm_ray.workflows.calibrate`)."""

from __future__ import annotations

import argparse

from stfpm_ray.cli.flags import add_checkpoints, add_config_options, print_config
from stfpm_ray.workflows.calibrate import calibrate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoints(parser)
    parser.add_argument(
        "--good",
        nargs="+",
        metavar="PATH_OR_URI",
        help="images known to be good, from the conditions to calibrate for (a handful to a few dozen): folders, "
        "files, s3:// or gs:// prefixes; required unless --adaptive",
    )
    parser.add_argument("--category", help="the category to calibrate (may be left out with one checkpoint)")
    parser.add_argument(
        "--target-far",
        type=float,
        default=None,
        help="false-alarm rate on good images the new threshold is set for (default: the target of the "
        "operating point in force)",
    )
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="decide each later run from its own median and spread (for lines whose nights shift as a whole and "
        "where defects are rare); without --good, set from the good scores of the operating point in force",
    )
    add_config_options(parser)


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        return print_config(args)
    calibrate(args.checkpoints, args.good, category=args.category, target_far=args.target_far, adaptive=args.adaptive)
    return 0
