"""``stfpm-ray score``: score every image under the inputs into a scores table, as one commit.

The steps, in the order an operator would list them:

1. **Hold the table** (:func:`stfpm_ray.store.publish.table_run`): one writer per table, the mode checked
   (a plain run refuses an existing table, ``--incremental`` appends, ``--overwrite`` replaces).
2. **Check the checkpoints** on the driver, before Ray starts
   (:func:`stfpm_ray.core.checkpoint.discover_checkpoints`): a broken one is one line naming the file, and
   its category's images become error rows while the other categories are scored.
3. **List the inputs** (:mod:`stfpm_ray.data.listing`: local folders, ``s3://``, ``gs://``) and **plan**
   (:mod:`stfpm_ray.data.plan`): route each file to its category, drop what already has an ok row for its
   model (``--incremental``), cut the rest in blocks.
4. **Score on Ray** (:mod:`stfpm_ray.ray.pipeline`): decode tasks, an actor pool of scorers, write tasks.
5. **Publish** (:meth:`stfpm_ray.store.publish.TableRun.publish`): exactly one row per planned image, the
   retried error rows retired, the manifest recorded, one Delta commit.
6. **Check the operating points** (:mod:`stfpm_ray.evaluate.drift`): per category, whether this run's scores
   keep the false-alarm rate each threshold promised; one line per category where they do not, with what to
   do about it.

Reading the output (``OUT_DIR`` is the ``--out`` table; these lines decode one anomaly map)::

    import io, numpy as np
    from deltalake import DeltaTable
    from PIL import Image
    row = DeltaTable(OUT_DIR).to_pandas().query("status == 'ok'").iloc[0]
    png = np.asarray(Image.open(io.BytesIO(row.anomaly_map)), dtype=np.float32)
    anomaly_map = png / 65535 * row.map_scale  # (height, width) float32, short side map_size, max = map_scale

``score`` is the raw image score (maximum of the full-resolution map), ``score_norm = score / threshold``
and ``is_anomalous = score > threshold``, with the threshold of the checkpoint's operating point in force
(set from good images alone: at training, or later by ``stfpm-ray calibrate``). The table holds one row per
(path, model_id): several models appear for one path when the checkpoints change between runs, and an error
row is replaced when a later run scores its image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stfpm_ray.core.checkpoint import CheckpointMeta, discover_checkpoints
from stfpm_ray.data.images import IMAGE_EXTENSIONS
from stfpm_ray.data.listing import Listing, list_images
from stfpm_ray.data.plan import SPLITS, CategoryCounts, Plan, plan
from stfpm_ray.errors import InputNotFoundError, UserError
from stfpm_ray.evaluate.drift import drift_line, run_drift
from stfpm_ray.progress import Progress, fixed_width_table, log_progress
from stfpm_ray.ray.pipeline import ScoringOptions, score_plan
from stfpm_ray.store.publish import new_run_id, table_run
from stfpm_ray.store.scores import ScoresTable


@dataclass
class ScoreSummary:
    """What a run did; ``version`` is None when nothing was written."""

    run_id: str
    out_dir: str
    counts: dict[str, CategoryCounts] = field(default_factory=dict)
    rows_written: int = 0
    files_written: int = 0
    seconds: float = 0.0
    version: int | None = None  # the table version this run committed
    drift: dict[str, dict] = field(default_factory=dict)  # per category: did its operating point hold?

    @property
    def error_rows(self) -> int:
        return sum(counts.error for counts in self.counts.values())

    @property
    def drifted(self) -> list[str]:
        """The categories whose operating point did not hold in this run."""
        return sorted(name for name, drift in self.drift.items() if drift["detected"])

    def table(self) -> str:
        """The per-category ok/error/skipped counts and this run's flagged images, as aligned text."""
        rows = [
            (name, c.ok, c.error, c.skipped, self.drift.get(name, {}).get("run_flagged", 0))
            for name, c in sorted(self.counts.items())
        ]
        total = ("total", *(sum(row[i] for row in rows) for i in (1, 2, 3, 4)))
        return fixed_width_table(("category", "ok", "error", "skipped", "flagged"), [*rows, total])


def score_images(
    checkpoints: str | Path,
    inputs: str | Sequence[str],
    out_dir: str | Path,
    options: ScoringOptions = ScoringOptions(),
    category: str | None = None,
    incremental: bool = False,
    overwrite: bool = False,
    split: str = "test",
    progress: Progress = log_progress,
) -> ScoreSummary:
    """Score every image under ``inputs`` into the scores table ``out_dir``; see the module docstring."""
    if split not in SPLITS:
        raise UserError(f"--split takes {' or '.join(SPLITS)}, got {split!r}")
    if incremental and overwrite:
        raise UserError("--incremental and --overwrite exclude each other")
    inputs = [inputs] if isinstance(inputs, str) else [str(i) for i in inputs]
    mode = "incremental" if incremental else "overwrite" if overwrite else "plain"
    started, run_id = time.time(), new_run_id()
    with table_run(str(out_dir), run_id, mode) as run:
        if run.took_over is not None:
            progress(f"took over the lease of {run.took_over.describe()}: that run is gone")
        for dead, count in run.recovered.items():
            progress(f"run {dead} died before its commit: deleted the {count} data files it left")
        models, problems = _usable_checkpoints(checkpoints, category, progress)
        listing = _listing(inputs, progress)
        metas = {name: meta for name, (_, meta) in models.items()}
        planned = plan(listing, metas, problems, category, run.already_scored, options.batch_size, split)
        _check_routed(planned, listing, models, problems, inputs)
        summary = ScoreSummary(run_id=run_id, out_dir=run.table.uri, counts=planned.counts)
        if not planned.blocks:
            progress(
                f"nothing new to score: all {planned.skipped} images already have ok rows for their models; "
                "nothing written"
            )
            summary.seconds = time.time() - started
            return summary
        progress(
            f"{listing.files.num_rows} images: {planned.images} to score, {planned.skipped} already scored (skipped)"
        )
        files = score_plan(planned, listing.sources, models, options, run.table, run_id, progress)
        manifest = _manifest(run_id, started, mode, inputs, checkpoints, models, options, listing)
        published = run.publish(files, planned.paths, manifest, planned.skipped_by_category)
    for name, tally in published.counts.items():
        summary.counts[name].ok, summary.counts[name].error = tally["ok"], tally["error"]
    summary.version, summary.seconds = published.version, time.time() - started
    summary.rows_written, summary.files_written = published.rows, published.files
    progress(
        f"wrote {summary.rows_written} rows in {summary.files_written} files to {summary.out_dir} "
        f"(table version {summary.version}, {summary.seconds:.1f} s)"
    )
    summary.drift = _drift(run.table, summary, models)
    for name in summary.drifted:
        progress(drift_line(name, summary.drift[name], str(checkpoints)))
    return summary


def _drift(table: ScoresTable, summary: ScoreSummary, models: dict[str, tuple[str, CheckpointMeta]]) -> dict:
    """Per category, whether this run's rows kept the promise of the operating point that decided them."""
    rows = table.run_rows(summary.version, summary.run_id, ["category", "score", "label", "status"])
    return run_drift(rows, {name: meta.operating_point for name, (_, meta) in models.items()})


def _usable_checkpoints(
    checkpoints: str | Path, category: str | None, progress: Progress
) -> tuple[dict[str, tuple[str, CheckpointMeta]], dict[str, str]]:
    """Valid checkpoints and, per broken category, the one line that says why (printed here, once)."""
    found, problems = discover_checkpoints(checkpoints)
    for name, problem in sorted(problems.items()):
        progress(f"checkpoint of {name} is unusable, its images become error rows: {problem}")
    if category is not None and category not in found:
        have = ", ".join(sorted(found)) or "none usable"
        raise UserError(f"no usable checkpoint for category {category!r} under {checkpoints} (have: {have})")
    return found, problems


def _listing(inputs: list[str], progress: Progress) -> Listing:
    """The input files; an input without a single image file is an error, not an empty run."""
    listing = list_images(inputs)
    if listing.files.num_rows == 0:
        raise InputNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {', '.join(inputs)}")
    for reason, count in sorted(listing.skipped.items()):
        progress(f"listing: skipped {count} {reason}")
    return listing


def _check_routed(planned: Plan, listing: Listing, models: dict, problems: dict[str, str], inputs: list[str]) -> None:
    """Refuse a run none of whose images has a model: the inputs or ``--category`` are wrong."""
    if not planned.counts:
        raise InputNotFoundError(f"only training images under {', '.join(inputs)}; pass --split all to score them")
    if all(name not in models and name not in problems for name in planned.counts):
        raise UserError(
            f"none of the {listing.files.num_rows} images belongs to a category with a checkpoint "
            f"({', '.join(sorted(models))}); for a plain folder of images pass --category"
        )


def _manifest(
    run_id: str,
    started: float,
    mode: str,
    inputs: list[str],
    checkpoints: str | Path,
    models: dict[str, tuple[str, CheckpointMeta]],
    options: ScoringOptions,
    listing: Listing,
) -> dict[str, Any]:
    """What the run was asked to do, recorded in its commit (the store adds what it wrote)."""
    return {
        "run_id": run_id,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "seconds": round(time.time() - started, 3),
        "mode": mode,
        "inputs": inputs,
        "checkpoints": str(checkpoints),
        "model_ids": {name: meta.model_id for name, (_, meta) in sorted(models.items())},
        "operating_points": {name: meta.operating_point.id for name, (_, meta) in sorted(models.items())},
        "map_size": options.map_size,
        "batch_size": options.batch_size,
        "precision": options.precision,
        "listing_skipped": listing.skipped,
    }
