"""Run ``stfpm-ray ARGS...`` and SIGKILL its driver at a named step (fault-injection tests; not a test module).

    python tests/kill_at.py STEP stfpm-ray-args...

The hook lives here, not in the package: this script patches the step's function in the driver process
before calling the CLI, and the process kills itself with SIGKILL there, so nothing after it runs (no
``finally``, no cleanup, no lease release), as with ``kill -9``, an OOM kill or a lost node. Steps:

* ``planned``: after the lease, listing and planning, before Ray scores anything;
* ``mid-write``: a write task has written its Parquet files and kills the driver before it returns (the
  sink is a subclass defined here, so Ray ships it to the write task by value);
* ``written``: every write task has returned, before the pre-commit check;
* ``commit``: right before the Delta log entry;
* ``committed``: right after the log entry, before the run's own bookkeeping (its record, the report).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from stfpm_ray import cli
from stfpm_ray.ray import pipeline
from stfpm_ray.store.scores import ScoresTable
from stfpm_ray.workflows import score

DRIVER = os.getpid()


def die() -> None:
    os.kill(DRIVER, signal.SIGKILL)
    time.sleep(60)  # a write task waits here for Ray to end it with its dead driver's job


class KillingSink(pipeline.ScoresSink):
    def write(self, blocks, ctx):
        super().write(blocks, ctx)
        die()


def before(function):
    def wrapped(*args, **kwargs):
        die()

    return wrapped


def after(function):
    def wrapped(*args, **kwargs):
        function(*args, **kwargs)
        die()

    return wrapped


if __name__ == "__main__":
    step, argv = sys.argv[1], sys.argv[2:]
    if step == "planned":
        score.score_plan = before(score.score_plan)
    elif step == "mid-write":
        pipeline.ScoresSink = KillingSink
    elif step == "written":
        score.score_plan = after(score.score_plan)
    elif step in ("commit", "committed"):
        ScoresTable.commit = (before if step == "commit" else after)(ScoresTable.commit)
    else:
        sys.exit(f"unknown step {step!r}")
    sys.exit(cli.main(argv))
