"""The ``stfpm-ray`` command line: synth, train, score, nightly, evaluate, benchmark.

Each verb is a module of this package exposing ``SUMMARY``, ``add_arguments(parser)`` and ``run(args) -> int``;
the ``jobs/*.py`` entry points for ``ray job submit`` call :func:`main` with their verb. A verb's module is
imported when that verb runs (a dispatch table), so ``stfpm-ray synth --help`` does not load Ray, and
``stfpm-ray --help``, ``--version``, a bare ``stfpm-ray`` or a mistyped verb load neither torch nor Ray.

A :class:`~stfpm_ray.errors.StfpmError` (wrong input, settings or output folder) is printed as one line with
exit code 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from stfpm_ray import __version__
from stfpm_ray.cli.console import setup_logging
from stfpm_ray.errors import StfpmError

VERBS = ("synth", "train", "score", "nightly", "evaluate", "benchmark")
SUMMARIES = {
    "synth": "write a synthetic MVTec-layout dataset (for demos and tests)",
    "train": "train one student per category with Ray Train, categories in parallel",
    "score": "score an image archive with Ray Data into a scores table (Delta Lake)",
    "nightly": "score what is new in an archive (incremental) and report the new anomalies",
    "evaluate": "per-category metrics and an HTML report from a scores table",
    "benchmark": "train, score and evaluate every category of a dataset root",
}


def _verb(name: str):
    return importlib.import_module(f"stfpm_ray.cli.{name}")


def _add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    """``-v``/``-q`` before or after the verb (SUPPRESS: a verb's parser never resets what the top level set)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="also show Ray's own logs and progress bars, and debug messages")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="only warnings and errors (the exit status tells the outcome)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stfpm-ray",
        description="STFPM anomaly detection as distributed Ray jobs. Run `stfpm-ray COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"stfpm-ray {__version__}")
    _add_verbosity(parser, argparse.SUPPRESS)
    parser.set_defaults(verbose=False, quiet=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in VERBS:
        child = sub.add_parser(name, help=SUMMARIES[name], description=SUMMARIES[name])
        _add_verbosity(child, argparse.SUPPRESS)
        if command == name:
            _verb(name).add_arguments(child)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if arg in VERBS), None)
    args = build_parser(command).parse_args(argv)
    if args.verbose and args.quiet:
        print("stfpm-ray: error: -v/--verbose and -q/--quiet exclude each other", file=sys.stderr)
        return 2
    setup_logging(args.verbose, args.quiet)
    try:
        return int(_verb(args.command).run(args) or 0)
    except StfpmError as exc:
        print(f"stfpm-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stfpm-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
