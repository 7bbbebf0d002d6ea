"""Start-up time of the command line for answers that need no work: help, version, a mistyped verb.

Each command runs as a fresh process ``--repeat`` times and the median wall time is printed, beside the
time of importing torch and Ray (what such answers used to cost).

    python benchmarks/cli_startup.py
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from stfpm_ray.progress import fixed_width_table


def median_seconds(command: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cli = shutil.which("stfpm-ray", path=str(Path(sys.executable).parent)) or "stfpm-ray"
    cases = {
        "stfpm-ray --help": [cli, "--help"],
        "stfpm-ray --version": [cli, "--version"],
        "stfpm-ray trian (typo)": [cli, "trian"],
        "stfpm-ray train --help": [cli, "train", "--help"],
        "python -c 'import torch, ray' (reference)": [sys.executable, "-c", "import torch, ray"],
    }
    rows = [(name, f"{median_seconds(command, args.repeat):.2f}") for name, command in cases.items()]
    print(fixed_width_table(("command", "median s"), rows, rule=True))


if __name__ == "__main__":
    main()
