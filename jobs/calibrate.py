"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/calibrate.py --checkpoints CKPT_DIR
--category NAME --good s3://bucket/known-good/``.

Same arguments as ``stfpm-ray calibrate``. It scores a few dozen images on the job's driver (no workers), so it
also runs as plain ``python jobs/calibrate.py`` without a cluster; on a multi-node cluster the checkpoint
folder must be on storage the nightly jobs read (NFS).
"""

import sys
from pathlib import Path

# `python jobs/calibrate.py` puts jobs/ first on sys.path, not the uploaded working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stfpm_ray import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["calibrate", *sys.argv[1:]]))
