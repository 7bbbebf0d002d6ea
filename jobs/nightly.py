"""Ray job: nightly rescoring of an image archive, and a report of the new anomalies it found.

    ray job submit --working-dir . -- python jobs/nightly.py \\
        --checkpoints CKPT_DIR --input s3://bucket/archive --out s3://bucket/scores [score options]

Takes every option of ``stfpm-ray score`` (``--config FILE`` too: a path inside the uploaded working
directory) and always runs it ``--incremental``: images that already have an ``ok`` row for their current
model are skipped, so a nightly run costs what arrived since the last one;
error rows are retried and replaced, and a run that failed is simply run again. The report lists, per
category, this run's rows with ``is_anomalous`` true (read from the table version the run committed) and is
written to ``OUT/_reports/nightly-<run_id>.json`` beside the table, first listing the categories whose
operating point did not hold. Exit status: 0 when every row is ok and every operating point held, whatever it
found; 3 when error rows were written (unreadable images, unusable checkpoints); 4 when a category's operating
point did not hold (its flagged images are not to be trusted until the line is checked or the category
recalibrated with ``jobs/calibrate.py``); 2 for a user error (nothing written, e.g. another run holds the
table's lease).
"""

import sys
from pathlib import Path

# `python jobs/nightly.py` puts jobs/ first on sys.path, not the uploaded working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stfpm_ray import cli  # noqa: E402
from stfpm_ray.workflows.nightly import format_report, new_anomalies, nightly, write_report  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    return cli.main(["nightly", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
