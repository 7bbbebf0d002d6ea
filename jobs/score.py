"""Entry point for ``ray job submit``: the arguments of ``stfpm-ray score``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/score.py --checkpoints CKPT_DIR --input s3://bucket/archive --out s3://bucket/scores --incremental

Ray connects the job to its cluster through ``RAY_ADDRESS``; ``--working-dir .`` ships this repository,
whose root is put on the path so the package imports even where it is not installed; a ``--config FILE``
is a path inside it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stfpm_ray import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["score", *sys.argv[1:]]))
