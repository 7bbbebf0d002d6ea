"""``stfpm-ray evaluate``: per-category metrics and an HTML report (see :mod:`stfpm_ray.evaluate.evaluation`)."""

from __future__ import annotations

import argparse

from stfpm_ray.errors import OutputExistsError
from stfpm_ray.evaluate.evaluation import evaluate_scores
from stfpm_ray.store.fs import is_file, resolve

# The file whose presence means a folder already holds a report (the others are written beside it).
REPORT_MARKER = "metrics.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="scores table written by `stfpm-ray score` (Delta Lake folder)")
    parser.add_argument(
        "--version", type=int, default=None, metavar="N", help="evaluate table version N (default: the current version)"
    )
    parser.add_argument(
        "--out", required=True, metavar="REPORT_DIR", help="report folder: metrics.json, metrics.csv, report.html"
    )
    parser.add_argument(
        "--model-id",
        action="append",
        metavar="ID",
        help="evaluate this model (repeat for several categories); default: each category's newest model",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the report already in REPORT_DIR")


def run(args: argparse.Namespace) -> int:
    if not args.overwrite and is_file(resolve(args.out).join(REPORT_MARKER)):
        raise OutputExistsError(
            f"{args.out} already holds a report ({REPORT_MARKER}); pass --overwrite to "
            "replace it, or choose another --out"
        )
    evaluate_scores(args.scores, args.out, model_id=args.model_id, version=args.version)
    return 0
