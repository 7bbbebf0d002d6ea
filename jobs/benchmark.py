"""Ray job entry point: train every category, score every test split, evaluate, print the table.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/benchmark.py --data ROOT --out RUN_DIR --gpus-per-worker 1 --gpus-per-actor 1

Same arguments as ``stfpm-ray benchmark``, ``--config FILE`` included (a path inside the uploaded working
directory), and ``--resume`` to continue a job that died. On a multi-node cluster ``--data`` and ``--out`` must be on
storage every node reads (NFS) and ``--storage-path`` on storage every node reaches (NFS, ``s3://``).
"""

import sys
from pathlib import Path

# `python jobs/benchmark.py` puts jobs/ first on sys.path, not the uploaded working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stfpm_ray import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["benchmark", *sys.argv[1:]]))
