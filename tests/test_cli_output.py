"""What a person sees: a tiny `train` and `score` run as real processes print only stfpm-ray's own lines,
and `-v` brings Ray's back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stfpm_ray.data.synth import generate_dataset

pytestmark = pytest.mark.slow

# What leaks when Ray owns the terminal: worker prefixes, C++ log lines, Tune's box and hints, colours.
RAY_INTERNALS = re.compile(
    r"\(\w+ pid=\d+\)|core_worker|raylet|Traceback|TensorBoard|View detailed results|"
    r"[╭│╰]|\x1b\[|Started a local Ray instance|INFO worker\.py|WARNING|Running Dataset"
)


def _run(*args: str) -> tuple[int, list[str]]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "COLUMNS": "120"}
    done = subprocess.run(
        [sys.executable, "-m", "stfpm_ray.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    return done.returncode, (done.stdout + done.stderr).splitlines()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-output")
    generate_dataset(root / "data", categories=1, size=64, n_train=10, n_test=6, seed=0)
    return root


def test_train_and_score_print_only_their_own_lines(tiny):
    status, lines = _run(
        "train",
        "--data",
        str(tiny / "data"),
        "--categories",
        "all",
        "--out",
        str(tiny / "ckpt"),
        "--epochs",
        "2",
        "--image-size",
        "64",
        "--batch-size",
        "8",
    )
    assert status == 0, "\n".join(lines)
    assert len(lines) <= 25 and not [line for line in lines if RAY_INTERNALS.search(line)], "\n".join(lines)
    assert any(re.search(r"epoch 1/2 .* img/s, ETA \d+m\d\ds", line) for line in lines), "\n".join(lines)
    assert any("(1/1 categories finished)" in line for line in lines)

    status, lines = _run(
        "score", "--checkpoints", str(tiny / "ckpt"), "--input", str(tiny / "data"), "--out", str(tiny / "scores")
    )
    assert status == 0, "\n".join(lines)
    assert len(lines) <= 15 and not [line for line in lines if RAY_INTERNALS.search(line)], "\n".join(lines)
    assert any(line.startswith("wrote ") and "table version 0" in line for line in lines)

    status, lines = _run(
        "score",
        "-v",
        "--checkpoints",
        str(tiny / "ckpt"),
        "--input",
        str(tiny / "data"),
        "--out",
        str(tiny / "scores-verbose"),
    )
    assert status == 0, "\n".join(lines)
    assert [line for line in lines if RAY_INTERNALS.search(line)], "-v shows Ray's own lines again"

    status, lines = _run(
        "score",
        "-q",
        "--checkpoints",
        str(tiny / "ckpt"),
        "--input",
        str(tiny / "data"),
        "--out",
        str(tiny / "scores"),
        "--incremental",
    )
    assert (status, lines) == (0, [])
