"""``python -m stfpm_ray.cli``: the same as the ``stfpm-ray`` command."""

import sys

from stfpm_ray.cli import main

sys.exit(main())
