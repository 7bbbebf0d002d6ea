"""``stfpm-ray score``: score an image archive into a scores table (see :mod:`stfpm_ray.workflows.score`)."""

from __future__ import annotations

import argparse

from stfpm_ray.cli.flags import print_config
from stfpm_ray.cli.options import add_score_arguments, connect, exit_status, scoring_options
from stfpm_ray.progress import log_progress
from stfpm_ray.workflows.score import score_images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_score_arguments(parser)


def run(args: argparse.Namespace) -> int:
    options = scoring_options(args)
    if args.print_config:
        return print_config(args)
    connect(args)
    summary = score_images(
        args.checkpoints,
        args.input,
        args.out,
        options,
        category=args.category,
        incremental=args.incremental,
        overwrite=args.overwrite,
        split=args.split,
    )
    log_progress(summary.table())
    return exit_status(summary.error_rows, summary.drifted)
