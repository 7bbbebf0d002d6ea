"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/export.py --checkpoints CKPT_DIR
--out EXPORT_DIR``.

Same arguments as ``stfpm-ray export``. It exports on the job's driver (no workers), so it also runs as plain
``python jobs/export.py`` without a cluster.
"""

import sys
from pathlib import Path

# `python jobs/export.py` puts jobs/ first on sys.path, not the uploaded working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stfpm_ray import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["export", *sys.argv[1:]]))
