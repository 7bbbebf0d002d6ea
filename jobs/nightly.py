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

import sys
from pathlib import Path

# `python jobs/nightly.py` puts jobs/ first on sys.path, not the uploaded working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stfpm_ray.cli.nightly import build_parser, main  # noqa: E402,F401
from stfpm_ray.ray.nightly import format_report, new_anomalies, nightly, write_report  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
