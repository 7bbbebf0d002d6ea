"""Fault injection: the driver of a first run and of a later run is killed with SIGKILL at each step
(tests/kill_at.py), and the next ``nightly`` exits 0 with every input image exactly once in the table and no
file left that the table does not hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import plain_folder, read_scores
from deltalake import DeltaTable

from stfpm_ray import cli
from stfpm_ray.store.scores import ScoresTable

KILL_AT = Path(__file__).with_name("kill_at.py")
STEPS = ["planned", "mid-write", "written", "commit", "committed"]


def _killed_run(step: str, verb: str, checkpoints: Path, inputs: Path, out: Path, category: str, address: str) -> None:
    """``verb`` in a driver process of its own on the test session's Ray cluster, killed at ``step``."""
    argv = [verb, "--checkpoints", str(checkpoints), "--input", str(inputs), "--out", str(out)]
    argv += ["--category", category, "--address", address, "-q"]
    process = subprocess.run([sys.executable, str(KILL_AT), step, *argv], capture_output=True, text=True, timeout=300)
    assert process.returncode == -9, process.stderr[-2000:]


def _assert_exactly_once(out: Path, inputs: Path) -> None:
    frame = read_scores(out)
    assert sorted(frame.path) == sorted(str(p) for p in inputs.iterdir()) and (frame.status == "ok").all()
    live = sorted(os.path.basename(uri) for uri in DeltaTable(str(out)).file_uris())
    assert sorted(p.name for p in out.glob("*.parquet")) == live  # no orphan data files
    assert not (out / "_stfpm" / "runs").exists() and not (out / "_stfpm" / "lease.json").exists()


@pytest.mark.parametrize("step", STEPS)
def test_a_run_killed_at_any_step_is_recovered_by_the_next_nightly(ray_session, trained, synth_root, tmp_path, step):
    checkpoints, category = trained[0], trained[1][0]
    inputs, out = tmp_path / "inbox", tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    nightly = ["nightly", "--checkpoints", str(checkpoints), "--input", str(inputs), "--out", str(out)]
    nightly += ["--category", category, "-q"]
    plain_folder(inputs, synth_root, category, 4)
    _killed_run(step, "score", checkpoints, inputs, out, category, address)  # the first run into a new folder
    if step in ("mid-write", "written", "commit"):
        assert list(out.glob("*.parquet")) and not (out / "_delta_log").exists()
    assert cli.main(nightly) == 0
    _assert_exactly_once(out, inputs)

    plain_folder(inputs, synth_root, category, 3, start=4)
    _killed_run(step, "nightly", checkpoints, inputs, out, category, address)  # a later run
    assert cli.main(nightly) == 0
    _assert_exactly_once(out, inputs)


def test_a_refused_command_creates_nothing(tmp_path, synth_root):
    """Exit 2 from a refusal after the lease (here: no checkpoint) leaves neither --out nor _stfpm/ behind."""
    out = tmp_path / "scores"
    argv = ["score", "--checkpoints", str(tmp_path / "none"), "--input", str(synth_root), "--out", str(out), "-q"]
    assert cli.main(argv) == 2 and not out.exists()
    (out / "notes").mkdir(parents=True)
    assert cli.main([*argv, "--incremental"]) == 2  # a folder that is not a table: refused
    assert [p.name for p in out.iterdir()] == ["notes"]


@pytest.mark.parametrize("damage", ["missing data file", "corrupt log entry"])
def test_a_damaged_table_is_refused_then_repaired_and_the_next_nightly_scores_every_image_once(
    ray_session, trained, synth_root, tmp_path, capsys, damage
):
    checkpoints, category = trained[0], trained[1][0]
    inputs, out = tmp_path / "inbox", tmp_path / "out"
    nightly = ["nightly", "--checkpoints", str(checkpoints), "--input", str(inputs), "--out", str(out)]
    nightly += ["--category", category, "-q"]
    plain_folder(inputs, synth_root, category, 4)
    assert cli.main(nightly) == 0
    plain_folder(inputs, synth_root, category, 3, start=4)
    assert cli.main(nightly) == 0
    if damage == "missing data file":  # the second night's file
        [second, *_] = ScoresTable(str(out)).history()
        (out / second["manifest"]["files"][0]["name"]).unlink()
    else:
        entry = out / "_delta_log" / "00000000000000000001.json"
        entry.write_bytes(entry.read_bytes()[:200])
    capsys.readouterr()
    assert cli.main(nightly) == 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "stfpm-ray table repair" in err
    assert cli.main(["table", "repair", "--scores", str(out)]) == 0
    assert cli.main(nightly) == 0
    assert cli.main(["table", "vacuum", "--scores", str(out), "--retention-hours", "0"]) == 0
    _assert_exactly_once(out, inputs)
