"""Nightly rescoring of an image archive, and a report of the new anomalies it found (``jobs/nightly.py``).

Runs ``stfpm-ray score --incremental``: images that already have an ``ok`` row for their current model are
skipped, so a nightly run costs what arrived since the last one; error rows are retried (and replaced), and
a run that failed is simply run again. The report lists, per category, this run's rows over the threshold
that decided the run (an adaptive operating point's is the run's own); it reads only the rows of this run
(``run_id``, pushed down to the Parquet reader) of the version it committed, and is written to
``OUT/_reports/nightly-<run_id>.json`` beside the table.
Every night adds a small file; past :data:`~stfpm_ray.workflows.table.COMPACT_AFTER` of them the run
compacts the table (a commit of its own that changes no row).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from stfpm_ray.errors import UserError
from stfpm_ray.progress import Progress, fixed_width_table, log_progress
from stfpm_ray.ray.pipeline import ScoringOptions
from stfpm_ray.store.fs import resolve, write_text_atomic
from stfpm_ray.store.scores import ScoresTable
from stfpm_ray.workflows.score import ScoreSummary, score_images
from stfpm_ray.workflows.table import compact_when_needed

REPORTS = "_reports"
DEFAULT_TOP = 20
REPORT_COLUMNS = ["path", "category", "score", "status"]


def new_anomalies(out_dir: str, summary: ScoreSummary, top: int = DEFAULT_TOP) -> dict[str, Any]:
    """The report of one scoring run: per category, rows scored, errors, skipped, and the anomalous rows.

    ``anomalies`` holds every anomalous row of the run's categories (paths and scores, most anomalous first)
    up to ``top`` per category; ``anomalous`` always counts them all.
    """
    categories: dict[str, dict[str, Any]] = {
        name: {
            "scored": 0,
            "errors": 0,
            "skipped": counts.skipped,
            "anomalous": 0,
            "anomalies": [],
            "drift": summary.drift.get(name),
        }
        for name, counts in summary.counts.items()
    }
    if summary.version is not None:
        table = ScoresTable(out_dir).run_rows(summary.version, summary.run_id, REPORT_COLUMNS)
        for name, entry in categories.items():
            rows = table.filter(pc.equal(table["category"], name))
            anomalous = _anomalous(rows, entry["drift"])
            entry.update(
                scored=rows.num_rows,
                errors=rows.filter(pc.equal(rows["status"], "error")).num_rows,
                anomalous=anomalous.num_rows,
                anomalies=anomalous.slice(0, top).to_pylist(),
            )
    return {
        "run_id": summary.run_id,
        # categories whose operating point did not hold: their anomalies are not to be trusted as they stand
        "drifted": summary.drifted,
        "out_dir": str(out_dir),
        "version": summary.version,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "scored": sum(c["scored"] for c in categories.values()),
        "new_anomalies": sum(c["anomalous"] for c in categories.values()),
        "categories": dict(sorted(categories.items())),
    }


def _anomalous(rows: pa.Table, drift: dict[str, Any] | None) -> pa.Table:
    """The run's anomalous rows of one category, most anomalous first: over the threshold that decided the run
    (an adaptive point's is the run's own, which the stored ``is_anomalous`` cannot know); no ok rows, none."""
    threshold = drift["threshold"] if drift else math.inf
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    above = ok.filter(pc.greater(ok["score"], threshold))
    norm = pc.divide(above["score"].cast(pa.float64()), threshold)
    return pa.table({"path": above["path"], "score": above["score"], "score_norm": norm}).sort_by(
        [("score_norm", "descending")]
    )


def write_report(out_dir: str, report: dict[str, Any]) -> str:
    """Write the report under ``OUT/_reports/`` (write then rename, so no reader sees half of it)."""
    target = resolve(out_dir).join(REPORTS, f"nightly-{report['run_id']}.json")
    write_text_atomic(target, json.dumps(report, indent=2))
    return target.name


def format_report(report: dict[str, Any]) -> str:
    """The job's log: first the categories whose operating point did not hold (the scoring step said why), then
    the per-category table and the most anomalous new images."""
    categories = report["categories"]
    drifted = [
        f"operating point did not hold for {name}: its {categories[name]['anomalous']} flagged images are not "
        "to be trusted as they stand"
        for name in report["drifted"]
    ]
    keys = ("scored", "errors", "skipped", "anomalous")
    rows = [(name, *(c[key] for key in keys)) for name, c in categories.items()]
    rows.append(("total", *(sum(c[key] for c in categories.values()) for key in keys)))
    lines = [*drifted, fixed_width_table(("category", *keys), rows)]
    for name, c in categories.items():
        for row in c["anomalies"]:
            lines.append(f"  {name}: {row['score_norm']:.3f} x threshold  {row['path']}")
    return "\n".join(lines)


def nightly(
    checkpoints: str | Path,
    inputs: str | Sequence[str],
    out_dir: str | Path,
    top: int = DEFAULT_TOP,
    options: ScoringOptions = ScoringOptions(),
    category: str | None = None,
    progress: Progress = log_progress,
    split: str = "test",
) -> tuple[dict[str, Any], str]:
    """Score what is new under ``inputs`` into ``out_dir`` (incrementally), then report; returns (report, path)."""
    if top < 0:
        raise UserError(f"--top must be >= 0, got {top}")
    summary = score_images(
        checkpoints, inputs, out_dir, options, category=category, incremental=True, split=split, progress=progress
    )
    report = new_anomalies(str(out_dir), summary, top)
    path = write_report(str(out_dir), report)
    compact_when_needed(str(out_dir), progress)
    progress(format_report(report))
    progress(
        f"nightly run {summary.run_id}: {report['new_anomalies']} new anomalies among {report['scored']} "
        f"newly scored images; report: {path}"
    )
    return report, path
