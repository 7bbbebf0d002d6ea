"""``stfpm-ray export``: one ONNX file and a JSON per category, to score without stfpm-ray (see
:mod:`stfpm_ray.workflows.export`)."""

from __future__ import annotations

import argparse

from stfpm_ray.cli.flags import add_checkpoints, add_config_options, print_config
from stfpm_ray.workflows.export import FORMATS, export_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoints(parser)
    parser.add_argument(
        "--out", required=True, metavar="EXPORT_DIR", help="folder for <category>.onnx and <category>.json"
    )
    parser.add_argument(
        "--format",
        default="onnx",
        choices=FORMATS,
        help="onnx: one .onnx file (pip install 'stfpm-ray[onnx]'); openvino: OpenVINO's .xml + .bin, fp32 "
        "(pip install 'stfpm-ray[openvino]')",
    )
    parser.add_argument("--categories", help="comma-separated categories to export (default: every checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace exports already in EXPORT_DIR")
    add_config_options(parser)


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        return print_config(args)
    categories = [name.strip() for name in args.categories.split(",") if name.strip()] if args.categories else None
    export_models(args.checkpoints, args.out, categories, fmt=args.format, overwrite=args.overwrite)
    return 0
