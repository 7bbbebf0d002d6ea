"""Ray job entry point: train one student per category on the cluster the job is submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/train.py --data ROOT --categories all --out CKPT_DIR --storage-path s3://bucket/ray-train

Same arguments as ``stfpm-ray train``, ``--config FILE`` included (a path inside the uploaded working
directory). On a multi-node cluster ``--data`` must be readable from every node
and ``--storage-path`` must be storage every node reaches (NFS, ``s3://``, ``gs://``); ``--out`` is written
by the job's driver only.
"""

import sys
from pathlib import Path

# `python jobs/train.py` puts jobs/ first on sys.path, not the uploaded working directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stfpm_ray import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["train", *sys.argv[1:]]))
