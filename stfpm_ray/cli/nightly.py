"""``stfpm-ray nightly`` (and ``jobs/nightly.py``): score what is new in an archive and report new anomalies
(see :mod:`stfpm_ray.workflows.nightly`)."""

from __future__ import annotations

import argparse

from stfpm_ray.cli.flags import print_config
from stfpm_ray.cli.options import add_score_arguments, connect, exit_status, scoring_options
from stfpm_ray.errors import UserError
from stfpm_ray.workflows.nightly import DEFAULT_TOP, nightly


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_score_arguments(parser, table_modes=False)
    # Not shown and not configuration: `score`'s modes typed out of habit. --incremental is what nightly
    # always does; --overwrite is refused with the reason rather than argparse's "unrecognized arguments".
    parser.add_argument("--incremental", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--top", type=int, default=DEFAULT_TOP, help="anomalous images listed per category in the report"
    )


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when every row is ok and every operating point held, whatever it found; 3 when error rows
    were written; 4 when a category's operating point did not hold."""
    if getattr(args, "overwrite", False):
        raise UserError("nightly runs are incremental; --overwrite would drop earlier nights' rows")
    vars(args).pop("incremental", None)  # what nightly always does: not part of its configuration
    options = scoring_options(args)
    if args.print_config:
        return print_config(args)
    connect(args)
    report, _ = nightly(
        args.checkpoints, args.input, args.out, top=args.top, options=options, category=args.category, split=args.split
    )
    return exit_status(sum(entry["errors"] for entry in report["categories"].values()), report["drifted"])
