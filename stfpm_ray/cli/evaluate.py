"""``stfpm-ray evaluate``: per-category metrics and an HTML report (see :mod:`stfpm_ray.evaluate.evaluation`)."""

from __future__ import annotations

import argparse

from stfpm_ray.evaluate.evaluation import evaluate_scores



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="scores table written by `stfpm-ray score` (Delta Lake folder)")
    parser.add_argument("--version", type=int, default=None, metavar="N",
                        help="evaluate table version N (default: the current version)")
    parser.add_argument("--out", required=True, help="report folder: metrics.json, metrics.csv, report.html")
    parser.add_argument(
        "--model-id",
        action="append",
        metavar="ID",
        help="evaluate this model (repeat for several categories); default: each category's newest model",
    )


def run(args: argparse.Namespace) -> int:
    evaluate_scores(args.scores, args.out, model_id=args.model_id, version=args.version)
    return 0
