"""``jobs/nightly.py``: score what is new in an archive and report new anomalies (see :mod:`stfpm_ray.ray.nightly`)."""

from __future__ import annotations

import argparse
import sys

from stfpm_ray.cli.console import setup_logging
from stfpm_ray.cli.options import add_score_arguments, connect, exit_status, scoring_options
from stfpm_ray.errors import StfpmError
from stfpm_ray.ray.nightly import DEFAULT_TOP, nightly

PROG = "jobs/nightly.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="score what is new in an archive (`stfpm-ray score --incremental`) and report new anomalies",
    )
    add_score_arguments(parser)
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help="anomalous images listed per category in the report (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 when every row is ok, whatever it found; EXIT_ERROR_ROWS (3) when error rows were written;
    2 for a user error."""
    args = build_parser().parse_args(argv)
    setup_logging(verbose=False)
    if args.overwrite:
        print(f"{PROG}: error: nightly runs are incremental; --overwrite would drop earlier nights' rows",
              file=sys.stderr)
        return 2
    try:
        options = scoring_options(args)
        connect(args)
        report, _ = nightly(args.checkpoints, args.input, args.out, top=args.top, options=options,
                            category=args.category)
    except StfpmError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return exit_status(sum(entry["errors"] for entry in report["categories"].values()))
