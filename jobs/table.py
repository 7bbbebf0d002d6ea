"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/table.py check --scores OUT``.

Same arguments as ``stfpm-ray table``. It runs on the job's driver alone (it reads and writes the table's
log and needs no workers), so it also runs as plain ``python jobs/table.py`` without a cluster.
"""

import sys
from pathlib import Path

# `python jobs/table.py` puts jobs/ first on sys.path, not the uploaded working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stfpm_ray import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["table", *sys.argv[1:]]))
