"""A damaged scores table is diagnosed in one line with exit status 5, never a traceback, and
``stfpm-ray table check|repair|vacuum`` finds and mends it: a deleted data file, a truncated log entry, a
folder this user may not write."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import need, read_scores
from deltalake import DeltaTable

from stfpm_ray import cli
from stfpm_ray.store.health import REPAIR_KEY
from stfpm_ray.store.publish import table_run
from stfpm_ray.store.scores import SCHEMA, write_data_files
from stfpm_ray.workflows.table import COMPACT_AFTER, compact_when_needed

DAMAGES = ["missing data file", "corrupt log entry"]


def _table(out: Path, nights: int = 3) -> None:
    """A table of ``nights`` commits of three rows each, one data file per commit (``r<night>-00000``)."""
    for night in range(nights):
        with table_run(str(out), f"r{night}", "incremental") as run:
            paths = [f"/{night}-{i}.png" for i in range(3)]
            rows = [{"path": p, "category": "c", "model_id": "m", "run_id": run.run_id, "status": "ok"} for p in paths]
            files = write_data_files(pa.Table.from_pylist(rows, SCHEMA), run.table.location, f"{run.run_id}-00000")
            run.publish(files, pa.chunked_array([paths]), {}, {})


def _damage(out: Path, damage: str) -> None:
    if damage == "missing data file":
        (out / "r1-00000.parquet").unlink()
    else:
        entry = out / "_delta_log" / "00000000000000000002.json"
        entry.write_bytes(entry.read_bytes()[:100])


def _one_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(fragment in err for fragment in fragments), err
    return err


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_verb_that_reads_a_damaged_table_says_so_in_one_line(tmp_path, capsys, damage):
    out = tmp_path / "scores"
    _table(out)
    _damage(out, damage)
    what = "are missing" if damage == "missing data file" else "log cannot be read"
    reads = [
        ["evaluate", "--scores", str(out), "--out", str(tmp_path / "report")],
        ["score", "--checkpoints", str(tmp_path), "--input", str(tmp_path), "--out", str(out), "--incremental"],
        ["nightly", "--checkpoints", str(tmp_path), "--input", str(tmp_path), "--out", str(out)],
    ]
    for argv in reads:
        assert cli.main([*argv, "-q"]) == 5
        _one_line(capsys, f"scores table {out}", what, "stfpm-ray table repair")
    assert not (tmp_path / "report").exists() and not (out / "_stfpm" / "lease.json").exists()


@pytest.mark.parametrize("damage", DAMAGES)
def test_table_repair_mends_the_table_in_one_step(tmp_path, capsys, damage):
    out = tmp_path / "scores"
    _table(out)
    _damage(out, damage)
    assert cli.main(["table", "check", "--scores", str(out)]) == 5
    assert ("data file missing: r1-00000.parquet" if damage == DAMAGES[0] else "log entries 2..2") in "".join(
        capsys.readouterr()
    )
    assert cli.main(["table", "repair", "--scores", str(out)]) == 0
    assert cli.main(["table", "check", "--scores", str(out)]) == 0
    lost = "1" if damage == DAMAGES[0] else "2"  # the night whose rows the next nightly scores again
    frame = read_scores(out)
    assert sorted(frame.path) == sorted(f"/{n}-{i}.png" for n in "012" if n != lost for i in range(3))
    if damage == DAMAGES[0]:  # dropped in one commit that says so
        [repair] = DeltaTable(str(out)).history(1)
        assert repair["version"] == 3 and json.loads(repair[REPAIR_KEY])["dropped_files"] == ["r1-00000.parquet"]
    else:  # the unreadable entry is kept aside, not deleted
        assert [p.name for p in out.glob("_stfpm/damaged/*/*")] == ["00000000000000000002.json"]
    _table(out, nights=1)  # the table takes new commits again


def test_table_vacuum_deletes_what_no_version_needs_and_checkpoints_the_log(tmp_path, capsys):
    out = tmp_path / "scores"
    _table(out)
    _damage(out, "corrupt log entry")
    assert cli.main(["table", "repair", "--scores", str(out)]) == 0  # r2-00000.parquet is no longer in any version
    assert cli.main(["table", "vacuum", "--scores", str(out)]) == 0  # a week's retention: a new file stays
    assert (out / "r2-00000.parquet").exists()
    assert cli.main(["table", "vacuum", "--scores", str(out), "--retention-hours", "0"]) == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == ["r0-00000.parquet", "r1-00000.parquet"]
    assert list(out.glob("_delta_log/*.checkpoint.parquet")) and len(read_scores(out)) == 6
    assert cli.main(["table", "check", "--scores", "/nonexistent/scores"]) == 2


def test_a_table_this_user_may_not_write_is_one_line(tmp_path, capsys):
    out = tmp_path / "scores"
    _table(out, nights=1)
    locked = subprocess.run(["chattr", "-R", "+i", str(out)], capture_output=True).returncode == 0
    need(locked, "needs chattr +i (root on ext4) to make a folder that root may not write")
    try:
        argv = ["nightly", "--checkpoints", str(tmp_path), "--input", str(tmp_path), "--out", str(out), "-q"]
        assert cli.main(argv) == 5
        _one_line(capsys, f"scores table {out}: no permission to write", "Operation not permitted")
    finally:
        subprocess.run(["chattr", "-R", "-i", str(out)], check=True)
    assert os.listdir(out / "_stfpm") == []


def test_compaction_merges_the_small_files_of_many_nights_without_changing_a_row(tmp_path):
    out = tmp_path / "scores"
    _table(out, nights=COMPACT_AFTER + 2)
    with table_run(str(out), "errors", "incremental") as run:  # an error file: error rows stay in files apart
        rows = [{"path": "/bad.png", "category": "c", "model_id": "m", "run_id": "errors", "status": "error"}]
        files = write_data_files(pa.Table.from_pylist(rows, SCHEMA), run.table.location, "errors-00000")
        run.publish(files, pa.chunked_array([["/bad.png"]]), {}, {})
    before = read_scores(out).sort_values("path").reset_index(drop=True)
    version = DeltaTable(str(out)).version()
    assert compact_when_needed(str(out)) == (COMPACT_AFTER + 2, 1)
    live = sorted(os.path.basename(uri) for uri in DeltaTable(str(out)).file_uris())
    assert len(live) == 2 and "errors-00000-errors.parquet" in live
    assert DeltaTable(str(out)).version() == version + 1
    after = read_scores(out).sort_values("path").reset_index(drop=True)
    assert after.equals(before)  # same rows, run ids and all
    assert len(DeltaTable(str(out), version=version).to_pandas()) == len(before)  # earlier versions still read
    assert compact_when_needed(str(out)) is None and not (out / "_stfpm" / "runs").exists()
