"""The ``stfpm-ray`` command line: synth, train, score, evaluate, benchmark.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; the
same modules back the ``jobs/*.py`` entry points used with ``ray job submit``. Modules are imported only
when their command runs, so ``stfpm-ray synth --help`` does not pay for importing Ray.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from stfpm_ray import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("stfpm_ray.data.synth", "write a synthetic MVTec-layout dataset (for demos and tests)"),
    "train": ("stfpm_ray.ray.train", "train one student per category with Ray Train, categories in parallel"),
    "score": ("stfpm_ray.ray.score", "score an image archive with Ray Data into Parquet"),
    "evaluate": ("stfpm_ray.evaluate.evaluation", "per-category metrics and an HTML report from scoring Parquet"),
    "benchmark": ("stfpm_ray.ray.benchmark", "train, score and evaluate every category of a dataset root"),
}

# Errors that mean "the user's input is wrong": shown as one line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConnectionError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stfpm-ray",
        description="STFPM anomaly detection as distributed Ray jobs. Run `stfpm-ray COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"stfpm-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        child = sub.add_parser(name, help=summary, description=summary)
        if command in (None, name):
            importlib.import_module(module_name).add_arguments(child)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if arg in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as exc:
        print(f"stfpm-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stfpm-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
