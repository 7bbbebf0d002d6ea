"""``stfpm-ray table check|repair|compact|vacuum`` (and ``jobs/table.py``): look after a scores table (see
:mod:`stfpm_ray.workflows.table`)."""

from __future__ import annotations

import argparse

from stfpm_ray.errors import TableError, UserError
from stfpm_ray.store.health import DEFAULT_RETENTION_HOURS
from stfpm_ray.workflows.table import check_table, compact_table, repair_table, vacuum_table

ACTIONS = ("check", "repair", "compact", "vacuum")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=ACTIONS,
        help="check: report damage, change nothing; repair: make the table load and read again; compact: merge "
        "small data files; vacuum: delete files no recent version needs and checkpoint the log",
    )
    parser.add_argument("--scores", required=True, help="scores table written by `stfpm-ray score` (Delta Lake folder)")
    parser.add_argument(
        "--retention-hours",
        type=int,
        default=DEFAULT_RETENTION_HOURS,
        help="vacuum: keep the files of versions younger than this, so `evaluate --version N` still works "
        f"for them (default: {DEFAULT_RETENTION_HOURS})",
    )


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when the table is healthy (after a repair: healthy again), 5 when it is damaged."""
    if args.retention_hours < 0:
        raise UserError(f"--retention-hours must be >= 0, got {args.retention_hours}")
    if args.action == "vacuum":
        vacuum_table(args.scores, args.retention_hours)
        return 0
    if args.action == "compact":
        compact_table(args.scores)
        return 0
    found = (check_table if args.action == "check" else repair_table)(args.scores)
    return 0 if found.healthy else TableError.exit_code
