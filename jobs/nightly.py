"""Ray job: nightly rescoring of an image archive, and a report of the new anomalies it found.

    ray job submit --working-dir . -- python jobs/nightly.py \\
        --checkpoints CKPT_DIR --input s3://bucket/archive --out s3://bucket/scores [score options]

Takes every option of ``stfpm-ray score`` and always runs it ``--incremental``: images that already have a
row for their current model are skipped, so a nightly run costs what arrived since the last one (and a run
that failed is simply run again). The report lists, per category, this run's rows with ``is_anomalous``
true; it reads only the Parquet files of this run's manifest (``OUT/_manifests/<run_id>.json``), never the
whole dataset, and is written to ``OUT/_reports/nightly-<run_id>.json`` beside the data (the leading ``_``
keeps it out of what pandas and pyarrow read as the dataset). Exit code 0 when the run succeeded, whatever
it found; unreadable images are counted as errors in the report, as they are rows in the output.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# `python jobs/nightly.py` puts jobs/ first on sys.path, not the uploaded working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.compute as pc  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402

from stfpm_ray.ray import score as ray_score  # noqa: E402
from stfpm_ray.cli import USER_ERRORS  # noqa: E402
from stfpm_ray.store.scores import resolve  # noqa: E402

REPORTS = "_reports"
DEFAULT_TOP = 20
REPORT_COLUMNS = ["path", "category", "score", "score_norm", "is_anomalous", "status"]


def new_anomalies(out_dir: str, summary: ray_score.ScoreSummary, top: int = DEFAULT_TOP) -> dict[str, Any]:
    """The report of one scoring run: per category, rows scored, errors, skipped, and the anomalous rows.

    ``anomalies`` holds every anomalous row of the run's categories (paths and scores, most anomalous first)
    up to ``top`` per category; ``anomalous`` always counts them all.
    """
    filesystem, root, prefix = resolve(out_dir)
    categories: dict[str, dict[str, Any]] = {
        name: {"scored": 0, "errors": 0, "skipped": counts.skipped, "anomalous": 0, "anomalies": []}
        for name, counts in summary.counts.items()
    }
    if summary.manifest is not None:
        with filesystem.open_input_stream(summary.manifest) as handle:
            manifest = json.loads(handle.read())
        files = [posixpath.join(root, entry["name"]) for entry in manifest["files"]]
        table = pads.dataset(files, filesystem=filesystem, format="parquet").to_table(columns=REPORT_COLUMNS)
        for name, entry in categories.items():
            rows = table.filter(pc.equal(table["category"], name))
            anomalous = rows.filter(pc.fill_null(rows["is_anomalous"], False)).sort_by([("score_norm", "descending")])
            entry.update(
                scored=rows.num_rows,
                errors=rows.filter(pc.equal(rows["status"], "error")).num_rows,
                anomalous=anomalous.num_rows,
                anomalies=anomalous.slice(0, top).select(["path", "score", "score_norm"]).to_pylist(),
            )
    return {
        "run_id": summary.run_id,
        "out_dir": str(out_dir),
        "manifest": None if summary.manifest is None else prefix + summary.manifest,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "scored": sum(c["scored"] for c in categories.values()),
        "new_anomalies": sum(c["anomalous"] for c in categories.values()),
        "categories": dict(sorted(categories.items())),
    }


def write_report(out_dir: str, report: dict[str, Any]) -> str:
    """Write the report under ``OUT/_reports/`` (write then rename, so no reader sees half of it)."""
    filesystem, root, prefix = resolve(out_dir)
    folder = posixpath.join(root, REPORTS)
    filesystem.create_dir(folder, recursive=True)
    path = posixpath.join(folder, f"nightly-{report['run_id']}.json")
    with filesystem.open_output_stream(path + ".tmp") as handle:
        handle.write(json.dumps(report, indent=2).encode())
    filesystem.move(path + ".tmp", path)
    return prefix + path


def format_report(report: dict[str, Any]) -> str:
    """The per-category table and the most anomalous new images, for the job's log."""
    categories = report["categories"]
    width = max([len("category"), len("total"), *(len(name) for name in categories)])
    lines = [f"{'category':<{width}} {'scored':>8} {'errors':>8} {'skipped':>8} {'anomalous':>10}"]
    for name, c in categories.items():
        lines.append(f"{name:<{width}} {c['scored']:>8} {c['errors']:>8} {c['skipped']:>8} {c['anomalous']:>10}")
    skipped, errors = (sum(c[key] for c in categories.values()) for key in ("skipped", "errors"))
    lines.append(f"{'total':<{width}} {report['scored']:>8} {errors:>8} {skipped:>8} {report['new_anomalies']:>10}")
    for name, c in categories.items():
        for row in c["anomalies"]:
            lines.append(f"  {name}: {row['score_norm']:.3f} x threshold  {row['path']}")
    return "\n".join(lines)


def nightly(
    checkpoints: str | Path,
    inputs: str | Sequence[str],
    out_dir: str | Path,
    top: int = DEFAULT_TOP,
    progress: Callable[[str], None] = print,
    **score_options: Any,
) -> tuple[dict[str, Any], str]:
    """Score what is new under ``inputs`` into ``out_dir`` (incrementally), then report; returns (report, path).

    ``score_options`` are those of :func:`stfpm_ray.ray.score.score_images` except the output mode.
    """
    if top < 0:
        raise ValueError(f"--top must be >= 0, got {top}")
    summary = ray_score.score_images(checkpoints, inputs, out_dir, incremental=True, progress=progress, **score_options)
    report = new_anomalies(str(out_dir), summary, top)
    path = write_report(str(out_dir), report)
    progress(format_report(report))
    progress(f"nightly run {summary.run_id}: {report['new_anomalies']} new anomalies among {report['scored']} "
             f"newly scored images; report: {path}")
    return report, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/nightly.py",
        description="score what is new in an archive (`stfpm-ray score --incremental`) and report new anomalies",
    )
    ray_score.add_arguments(parser)
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help="anomalous images listed per category in the report (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.overwrite:
        print("jobs/nightly.py: error: nightly runs are incremental; --overwrite would drop earlier nights' rows",
              file=sys.stderr)
        return 2
    if args.address:
        from stfpm_ray.ray.session import init_ray

        init_ray(args.address)
    try:
        nightly(
            args.checkpoints, args.input, args.out, top=args.top, category=args.category,
            **ray_score.scoring_options(args),
        )
    except USER_ERRORS as exc:
        print(f"jobs/nightly.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
