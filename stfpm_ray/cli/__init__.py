"""The ``stfpm-ray`` command line: synth, train, score, nightly, calibrate, export, evaluate, benchmark, table.

Each verb is a module of this package exposing ``add_arguments(parser)`` and ``run(args) -> int`` (its
summary and examples live here, so that help answers without importing it); the ``jobs/*.py`` entry points
for ``ray job submit`` call :func:`main` with their verb. A verb's module is imported when that verb runs (a
dispatch table), so ``stfpm-ray synth --help`` does not load Ray, and ``stfpm-ray --help``, ``--version``, a
bare ``stfpm-ray`` or a mistyped verb load neither torch nor Ray.

Every verb writes to ``--out`` and refuses an output that already holds a result unless ``--overwrite``
(``train`` and ``benchmark`` also take ``--resume``, ``score`` ``--incremental``; ``nightly`` only ever
appends). ``train``, ``score``, ``nightly`` and ``benchmark`` read ``--config FILE``
(:mod:`stfpm_ray.cli.flags`).

A :class:`~stfpm_ray.errors.StfpmError` (wrong input, settings, config file or output folder) is printed as
one line with exit code 2, a damaged or unreachable scores table (:class:`~stfpm_ray.errors.TableError`)
with 5; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from stfpm_ray import __version__
from stfpm_ray.cli.console import setup_logging
from stfpm_ray.cli.flags import HelpFormatter, with_config
from stfpm_ray.errors import StfpmError

VERBS = ("synth", "train", "score", "nightly", "calibrate", "export", "evaluate", "benchmark", "table")
SUMMARIES = {
    "synth": "write a synthetic MVTec-layout dataset (for demos and tests)",
    "train": "train one student per category with Ray Train, categories in parallel",
    "score": "score an image archive with Ray Data into a scores table (Delta Lake)",
    "nightly": "score what is new in an archive (incremental) and report the new anomalies",
    "calibrate": "set a category's threshold anew from known-good images of new conditions, no retraining",
    "export": "write each category's scoring model as one ONNX file plus a JSON, to deploy without stfpm-ray",
    "evaluate": "per-category metrics and an HTML report from a scores table",
    "benchmark": "train, score and evaluate every category of a dataset root",
    "table": "check, repair, compact or vacuum a scores table (a deleted file, a damaged log, years of nights)",
}
EXAMPLES = {
    "synth": ("stfpm-ray synth --out data/synth --num-categories 3",),
    "train": (
        "stfpm-ray train --data data/mvtec --categories bottle,screw --out runs/ckpt",
        "stfpm-ray train --config train.yaml --resume    # flags override the file",
    ),
    "score": (
        "stfpm-ray score --checkpoints runs/ckpt --input data/mvtec --out runs/scores",
        "stfpm-ray score --checkpoints runs/ckpt --input /archive --out runs/scores --incremental",
    ),
    "nightly": (
        "stfpm-ray nightly --checkpoints runs/ckpt --input /archive --out runs/scores",
        "stfpm-ray nightly --config nightly.yaml --print-config > resolved.yaml",
    ),
    "calibrate": (
        "stfpm-ray calibrate --checkpoints runs/ckpt --category screw --good /archive/2026-12-07/known-good",
    ),
    "export": ("stfpm-ray export --checkpoints runs/ckpt --out runs/export --categories bottle,screw",),
    "evaluate": ("stfpm-ray evaluate --scores runs/scores --out runs/report",),
    "benchmark": (
        "stfpm-ray benchmark --out runs/demo    # synthetic demo dataset",
        "stfpm-ray benchmark --data data/mvtec --categories bottle --out runs/bottle --resume",
    ),
    "table": (
        "stfpm-ray table check --scores runs/scores",
        "stfpm-ray table repair --scores runs/scores && stfpm-ray nightly --config nightly.yaml",
    ),
}


def _verb(name: str):
    return importlib.import_module(f"stfpm_ray.cli.{name}")


def _add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    """``-v``/``-q`` before or after the verb (SUPPRESS: a verb's parser never resets what the top level set)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="also show Ray's own logs and progress bars, and debug messages",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="only warnings and errors (the exit status tells the outcome)",
    )


def _parsers(command: str | None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The top-level parser, and the parser of ``command`` (None without one), the only verb whose flags
    are loaded. Verb flags must be spelled in full: a config file names them in full, and an abbreviation
    that works today breaks when a flag with the same prefix is added."""
    parser = argparse.ArgumentParser(
        prog="stfpm-ray",
        formatter_class=HelpFormatter,
        description="STFPM anomaly detection as distributed Ray jobs. Run `stfpm-ray COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"stfpm-ray {__version__}")
    _add_verbosity(parser, argparse.SUPPRESS)
    parser.set_defaults(verbose=False, quiet=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = None
    for name in VERBS:
        child = sub.add_parser(
            name,
            help=SUMMARIES[name],
            description=SUMMARIES[name],
            allow_abbrev=False,
            formatter_class=HelpFormatter,
            epilog="\n  ".join(("examples:", *EXAMPLES[name])),
        )
        _add_verbosity(child, argparse.SUPPRESS)
        if command == name:
            _verb(name).add_arguments(child)
            chosen = child
    return parser, chosen


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    return _parsers(command)[0]


def _error(command: str | None, exc: StfpmError) -> int:
    print(f"stfpm-ray {command}: error: {exc}", file=sys.stderr)
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if arg in VERBS), None)
    parser, verb_parser = _parsers(command)
    if verb_parser is not None:
        try:
            argv = with_config(verb_parser, argv, argv.index(command) + 1)
        except StfpmError as exc:
            return _error(command, exc)
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        print("stfpm-ray: error: -v/--verbose and -q/--quiet exclude each other", file=sys.stderr)
        return 2
    setup_logging(args.verbose, args.quiet)
    try:
        return int(_verb(args.command).run(args) or 0)
    except StfpmError as exc:
        return _error(args.command, exc)
    except KeyboardInterrupt:
        print(f"stfpm-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
