"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/evaluate.py --scores OUT --out REPORT``.

Same arguments as ``stfpm-ray evaluate``. Evaluation runs on the job's driver alone (it reads Parquet and
needs no workers), so it also runs as plain ``python jobs/evaluate.py`` without a cluster.
"""

import sys
from pathlib import Path

# `python jobs/evaluate.py` puts jobs/ first on sys.path, not the uploaded working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stfpm_ray import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["evaluate", *sys.argv[1:]]))
