"""Option groups shared by several verbs, and their typed values (TrainConfig, TrainResources, ScoringOptions).

The vocabulary is the same in every verb: ``--batch-size`` is the training batch wherever training happens,
``--score-batch-size`` the scoring batch, ``--out`` the output, ``--overwrite`` / ``--resume`` what to do
with an output that already holds a run.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stfpm_ray.cli.flags import Deprecated, add_checkpoints, add_config_options
from stfpm_ray.core.fit import TrainConfig
from stfpm_ray.core.model import PRECISIONS
from stfpm_ray.core.runtimes import RUNTIMES
from stfpm_ray.core.score import DEFAULT_MAP_SIZE
from stfpm_ray.core.students import RECIPE_FIELDS, STUDENTS
from stfpm_ray.data.plan import SPLITS
from stfpm_ray.errors import StfpmError
from stfpm_ray.progress import log_progress
from stfpm_ray.ray.pipeline import DEFAULT_BATCH_SIZE, ScoringOptions
from stfpm_ray.ray.resources import TrainResources, parse_actors
from stfpm_ray.ray.session import init_ray

# The value of the GPU flags that lets the cluster decide (None in TrainResources and ScoringOptions).
AUTO = "auto"

# Flags that set TrainConfig fields: (flag, field, type, help).
_CONFIG_FLAGS = (
    ("--epochs", "epochs", int, "epochs per category"),
    ("--batch-size", "batch_size", int, "images per optimizer step (split across a category's workers)"),
    (
        "--image-size",
        "image_size",
        int,
        "model input side in pixels (the short side with --aspect keep), a multiple of 32",
    ),
    (
        "--aspect",
        "aspect",
        str,
        "keep: the long side follows the category's training images (their median aspect, up to 4:1); "
        "square: every image squashed to image-size x image-size",
    ),
    ("--student", "student", str, "the student kind"),  # its choices and help come from the registry
    ("--lr", "lr", float, "learning rate: SGD's for a mirror student, Adam's for a reverse one"),
    ("--backbone", "backbone", str, "timm backbone of teacher and student (offline: tf_efficientnet_lite0/1/2)"),
    ("--weights", "weights", str, "teacher weights: auto|offline|hub|file:PATH"),
    ("--seed", "seed", int, "seed of the validation split, student init and batch order"),
    ("--augment", "augment", str, "training augmentation: none|photometric (brightness and contrast jitter)"),
    ("--augment-strength", "augment_strength", float, "photometric jitter: factors drawn from [1-s, 1+s]"),
    (
        "--combine",
        "combine",
        str,
        "anomaly map of the levels: product (official) or sum (each level divided by its mean on held-out good images)",
    ),
    (
        "--loss",
        "loss",
        str,
        "training loss: position (the map's distance averaged over positions), flat (reverse distillation's "
        "1 - cosine of each level's flattened map) or hard (the mean over each level's hardest 1%% of positions, "
        "EfficientAD's hard-feature loss)",
    ),
    (
        "--map-sigma",
        "map_sigma",
        float,
        "Gaussian smoothing of the anomaly map in pixels before its maximum (default: image size / 64 for the "
        "reverse student, 0 (none) for the mirror one)",
    ),
    (
        "--memory-bank",
        "memory_bank",
        int,
        "positions of the teacher's features on good training images kept (greedy coreset) and scored beside the "
        "student by nearest-neighbour distance; the two maps are averaged (default: 3000 for the reverse "
        "student, 0 (the student alone) for the mirror one)",
    ),
    (
        "--threads",
        "threads",
        int,
        "intra-op threads of the training arithmetic, part of the recipe: the same seed and threads give the "
        "same model whatever CPUs the workers reserve",
    ),
    (
        "--target-far",
        "target_far",
        float,
        "false-alarm rate on good images the threshold is calibrated for, from held-out good images",
    ),
)


# Exit status of score and nightly runs that completed but need a look, distinct from 0 (all rows ok, every
# operating point held) and 2 (a user error, nothing written), so a scheduler can alert on them: error rows
# were written (unreadable or undecodable files), or a category's operating point did not hold (its decisions
# cannot be trusted until someone checks the line or recalibrates; this one wins over error rows).
EXIT_ERROR_ROWS = 3
EXIT_DRIFT = 4


def exit_status(error_rows: int, drifted: list[str]) -> int:
    return EXIT_DRIFT if drifted else EXIT_ERROR_ROWS if error_rows else 0


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)"
    )


def connect(args: argparse.Namespace) -> None:
    """The one place ``--address`` is honoured. Without it the library starts (or reuses) Ray when it first
    needs it, so a run refused before any work never starts Ray."""
    if args.address:
        init_ray(args.address)


def add_training_options(parser: argparse.ArgumentParser, demo_defaults: dict[str, Any] | None = None) -> None:
    """The training and resource flags of ``train`` and ``benchmark``.

    Config flags default to None, meaning TrainConfig's default (or, in a command with ``demo_defaults``,
    the demo's), so that a caller can tell a value the user chose from a default.
    """
    defaults, demo = TrainConfig(), demo_defaults or {}
    for flag, field, kind, text in _CONFIG_FLAGS:
        default = (
            ", ".join(f"{getattr(student.recipe, field)} for {name}" for name, student in STUDENTS.items())
            if field in RECIPE_FIELDS
            else f"{getattr(defaults, field)}"
        )
        default += f"; demo without --data: {demo[field]}" if field in demo else ""
        choices = list(STUDENTS) if field == "student" else None
        if field == "student":
            text = "; ".join(f"{name}: {student.help}" for name, student in STUDENTS.items())
        parser.add_argument(flag, type=kind, default=None, choices=choices, help=f"{text} (default: {default})")
    parser.add_argument(
        "--workers-per-category",
        type=int,
        default=1,
        help="Ray Train workers per category; more than 1 trains data-parallel (DDP)",
    )
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs each worker reserves (default: --threads for CPU training; with GPUs, the cluster's CPUs "
        "shared among the workers that train at once)",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=gpus_argument,
        default=AUTO,
        help="GPUs per worker, fractions allowed with one worker per category; auto: 1 where the Ray cluster "
        "has GPUs, else 0",
    )
    parser.add_argument(
        "--storage-path",
        default=None,
        help="Ray Train run state, a local folder or URI (default: _ray/ in the checkpoint folder); "
        "multi-node clusters need storage every node reaches (NFS, s3://, gs://)",
    )
    parser.add_argument(
        "--max-failures", type=int, default=2, help="restarts of a category's workers from its last checkpoint"
    )


def train_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from the flags; unset flags keep ``defaults`` (a preset), else TrainConfig's defaults."""
    chosen = {field: getattr(args, field) for _, field, _, _ in _CONFIG_FLAGS if getattr(args, field) is not None}
    return TrainConfig(**{**(defaults or {}), **chosen})


def training_values(config: TrainConfig) -> dict[str, Any]:
    """The training flags' values in ``config``: what ``--print-config`` shows for flags left unset (None)."""
    values = asdict(config)
    return {field: values[field] for _, field, _, _ in _CONFIG_FLAGS}


def add_resume_or_overwrite(parser: argparse.ArgumentParser, resume_help: str, overwrite_help: str) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help=resume_help)
    mode.add_argument("--overwrite", action="store_true", help=overwrite_help)


def note_fresh_start(args: argparse.Namespace) -> None:
    """``--resume`` is what a retried job passes on every attempt, so its first attempt (nothing to resume
    yet) starts fresh instead of failing; this line makes that visible."""
    out = Path(args.out)
    if args.resume and not (out.is_dir() and any(out.iterdir())):
        log_progress(f"nothing to resume in {out}: starting fresh")


def train_resources(args: argparse.Namespace) -> TrainResources:
    return TrainResources(
        workers_per_category=args.workers_per_category,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=_gpus(args.gpus_per_worker),
        storage_path=args.storage_path,
        max_failures=args.max_failures,
    )


def gpus_argument(text: str) -> float | str:
    """``auto`` (kept as written, so that ``--print-config`` shows it) or a number of GPUs."""
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of GPUs, got {text!r}") from None


def _gpus(value: float | str) -> float | None:
    """A GPU flag's value as the resources take it: None for ``auto`` (decided from the cluster,
    :func:`~stfpm_ray.ray.resources.gpus_each`)."""
    return None if value == AUTO else float(value)


def _actors_argument(text: str) -> tuple[int, int]:
    try:
        return parse_actors(text)
    except StfpmError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_scoring_options(parser: argparse.ArgumentParser) -> None:
    """Model and resource flags of ``score``, ``nightly`` and ``benchmark``."""
    parser.add_argument("--score-batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per scoring batch")
    parser.add_argument(
        "--actors",
        type=_actors_argument,
        metavar="N|MIN,MAX",
        help="scoring actors (default: 1 up to the GPUs, or CPUs - 1 without GPUs)",
    )
    parser.add_argument(
        "--gpus-per-actor",
        type=gpus_argument,
        default=AUTO,
        help="GPUs per scoring actor (0: CPU); auto: 1 where the Ray cluster has GPUs, else 0",
    )
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor")
    parser.add_argument(
        "--map-size", type=int, default=DEFAULT_MAP_SIZE, help="stored anomaly map's short side in pixels (aspect kept)"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="network precision: auto (the one each threshold was calibrated in, fp32 unless calibrated in bf16; "
        "bf16 only on GPUs that run it natively), fp32, or bf16 (faster on Ampere or later GPUs and AVX512-BF16/AMX "
        "CPUs; scores then differ slightly from those the thresholds were set on)",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="what runs the networks: torch; onnxruntime or openvino (each category's model exported when the run "
        "starts, checked against PyTorch, fp32 on CPUs; pip install 'stfpm-ray[onnx]' or 'stfpm-ray[openvino]'); "
        "auto (the fastest installed one on this machine, measured when the run starts). The rows record which "
        "one scored them",
    )


def scoring_options(args: argparse.Namespace) -> ScoringOptions:
    return ScoringOptions(
        batch_size=args.score_batch_size,
        actors=args.actors,
        gpus_per_actor=_gpus(args.gpus_per_actor),
        cpus_per_actor=args.cpus_per_actor,
        map_size=args.map_size,
        precision=args.precision,
        runtime=args.runtime,
    )


def add_score_arguments(parser: argparse.ArgumentParser, table_modes: bool = True) -> None:
    """Everything ``stfpm-ray score`` takes; the nightly job takes the same without ``table_modes``
    (``--incremental``/``--overwrite``: it is always incremental). ``--batch-size`` was the scoring
    batch here until ``--batch-size`` came to mean the training batch everywhere; nightly cron lines still
    pass it, hence one release of grace."""
    add_checkpoints(parser)
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH_OR_URI",
        help="image folders or files, local or s3://, gs:// (an MVTec-layout root routes images to categories)",
    )
    parser.add_argument(
        "--out", required=True, metavar="OUT_DIR", help="scores table: a Delta Lake folder, local or s3://, gs://"
    )
    parser.add_argument("--category", help="score every input image with this category's model (plain archives)")
    parser.add_argument(
        "--split", choices=SPLITS, default="test", help="MVTec-layout roots: score test/ only, or all (train/good too)"
    )
    add_scoring_options(parser)
    parser.add_argument("--batch-size", type=int, dest="score_batch_size", action=Deprecated, use="--score-batch-size")
    if table_modes:
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument(
            "--incremental",
            action="store_true",
            help="nightly mode: skip images that already have a row for their model, append the rest",
        )
        mode.add_argument("--overwrite", action="store_true", help="replace the table already in OUT_DIR")
    add_address(parser)
    add_config_options(parser)
