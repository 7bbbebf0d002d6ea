"""benchmarks/gpu_check.sh runs to the end in its CPU dry run and prints its table, so that the first call on a
GPU machine (minutes of borrowed time) does not fail on a typo in a step CI never ran."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[1]
# Every step of the table, in order; a figure is a number with its unit, or the benchmark verb's exit status.
STEPS = [
    ("training", r"[\d.]+ images/s"),
    ("quality, fp32 vs bf16", r"image AUROC [\d.]+ vs [\d.]+, pixel AUROC [\d.]+ vs [\d.]+"),
    ("decode-only ceiling", r"[\d.]+ images/s"),
    ("forward-only ceiling, fp32", r"[\d.]+ images/s"),
    ("forward-only ceiling, bf16", r"[\d.]+ images/s"),
    ("actor scoring path, batch 16", r"[\d.]+ images/s"),
    ("--runtime auto, CPU actors", r"torch|onnxruntime"),
    ("CPU forward by runtime", r"torch [\d.]+, (onnxruntime|openvino) [\d.]+, (onnxruntime|openvino) [\d.]+ images/s"),
    ("core end to end", r"[\d.]+ images/s"),
    ("Ray pipeline", r"[\d.]+ images/s"),
    ("stfpm-ray benchmark", r"exit status 0, \d+ s"),
    ("end to end / decode-only ceiling", r"[\d.]+"),
]


def test_the_gpu_check_dry_run_prints_every_step_of_its_table():
    env = {**os.environ, "PYTHON": sys.executable, "LIMIT_S": "590"}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu"],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("| step | figure | details |") :].splitlines()
    assert table[1] == "|---|---|---|"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:] if line.startswith("|")]
    assert [row[0] for row in rows] == [step for step, _ in STEPS], rows
    for (step, figure), row in zip(STEPS, rows):
        assert re.fullmatch(figure, row[1]), (step, row)
    assert "gpu_check on CPU (dry run)" in result.stdout
