"""Publishing a run (stfpm_ray.store.publish): one commit of exactly one row per planned image, the run's own
files removed when it fails before its commit and kept once the commit has begun, the lease held throughout."""

from __future__ import annotations

import os
import shutil
import socket

import pyarrow as pa
import pytest
from conftest import read_scores
from deltalake import DeltaTable

from stfpm_ray.errors import UserError
from stfpm_ray.store import publish
from stfpm_ray.store.publish import table_run
from stfpm_ray.store.scores import SCHEMA, ScoresTable, write_data_files


def _rows(paths: list[str], run_id: str, status: str = "ok") -> pa.Table:
    return pa.Table.from_pylist(
        [{"path": p, "category": "c", "model_id": "m", "run_id": run_id, "status": status} for p in paths], SCHEMA
    )


def _write(run, paths: list[str], status: str = "ok") -> list:
    return write_data_files(_rows(paths, run.run_id, status), run.table.location, f"{run.run_id}-00000")


def test_a_run_is_published_as_one_commit_with_its_manifest(tmp_path):
    out = str(tmp_path / "scores")
    with table_run(out, "r1", "plain") as run:
        assert run.already_scored is None and (tmp_path / "scores" / "_stfpm" / "lease.json").is_file()
        files = _write(run, ["/a.png", "/b.png"]) + _write(run, ["/c.png"], "error")
        published = run.publish(files, pa.chunked_array([["/a.png", "/b.png", "/c.png"]]), {"mode": "plain"}, {"c": 4})
    assert (published.version, published.rows, published.files) == (0, 3, 2)
    assert published.counts == {"c": {"ok": 2, "error": 1}}
    manifest = ScoresTable(out).history()[0]["manifest"]
    assert manifest["counts"] == {"c": {"ok": 2, "error": 1, "skipped": 4}} and manifest["rows"] == 3
    assert not (tmp_path / "scores" / "_stfpm" / "lease.json").exists()  # released
    with table_run(out, "r2", "incremental") as run:  # the next night asks the table what it holds
        keys = pa.table({"path": ["/a.png", "/c.png", "/d.png"], "model_id": ["m", "m", "m"]})
        assert run.already_scored(keys).to_pylist() == [True, False, False]


@pytest.mark.parametrize("planned", [["/a.png", "/b.png", "/c.png"], ["/a.png"]], ids=["missing", "unplanned"])
def test_a_run_whose_rows_do_not_match_its_plan_commits_nothing_and_leaves_no_file(tmp_path, planned):
    out = tmp_path / "scores"
    with pytest.raises(RuntimeError, match="nothing was committed"):
        with table_run(str(out), "r1", "plain") as run:
            files = _write(run, ["/a.png", "/b.png"])
            run.publish(files, pa.chunked_array([planned]), {}, {})
    assert not DeltaTable.is_deltatable(str(out))
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == []


def test_a_failure_once_the_commit_began_keeps_the_files_it_may_have_published(tmp_path, monkeypatch):
    """A commit that raises may still have landed (a lost reply from object storage): its files must stay."""
    out = tmp_path / "scores"
    original = ScoresTable.commit

    def commit_then_fail(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise OSError("connection reset after the log entry was written")

    monkeypatch.setattr(ScoresTable, "commit", commit_then_fail)
    with pytest.raises(OSError, match="connection reset"):
        with table_run(str(out), "r1", "plain") as run:
            run.publish(_write(run, ["/a.png"]), pa.chunked_array([["/a.png"]]), {}, {})
    assert list(read_scores(out).path) == ["/a.png"]


def test_modes_are_checked_before_anything_is_read(tmp_path):
    out = str(tmp_path / "scores")
    with table_run(out, "r1", "plain") as run:
        run.publish(_write(run, ["/a.png"]), pa.chunked_array([["/a.png"]]), {}, {})
    with pytest.raises(FileExistsError, match="already holds a scores table"):
        with table_run(out, "r2", "plain"):
            pytest.fail("a plain run into an existing table must be refused")
    with pytest.raises(ValueError, match="mode must be one of"):
        with table_run(out, "r3", "append"):
            pass
    assert publish.new_run_id() != publish.new_run_id()


def _dead_run(out, run_id: str, paths: list[str], status: str = "ok") -> str:
    """What a run killed (kill -9) after its write tasks leaves: its record, its data files and its lease."""
    import json
    import subprocess

    table = ScoresTable(str(out))
    table.begin_run({"run_id": run_id, "mode": "plain"})
    rows = _rows(paths, run_id, status)
    name = write_data_files(rows, table.location, f"{run_id}-00000")[0].name
    process = subprocess.Popen(["true"])
    process.wait()
    holder = {"run_id": run_id, "user": "u", "host": socket.gethostname(), "pid": process.pid}
    (out / "_stfpm" / "lease.json").write_text(json.dumps({**holder, "started_at": "x", "heartbeat": 0.0}))
    return name


def _files(out) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", ["plain", "incremental", "overwrite"])
def test_a_first_run_killed_before_its_commit_is_cleaned_up_by_the_next_run_in_any_mode(tmp_path, mode):
    out = tmp_path / "scores"
    orphan = _dead_run(out, "dead", ["/a.png", "/b.png"])
    with table_run(str(out), "r2", mode) as run:
        assert run.recovered == {"dead": 1} and run.took_over is not None and not run.exists
        assert not (out / orphan).exists()
        run.publish(_write(run, ["/a.png"]), pa.chunked_array([["/a.png"]]), {}, {})
    assert list(read_scores(out).path) == ["/a.png"]
    live = sorted(os.path.basename(u) for u in DeltaTable(str(out)).file_uris())
    assert [f for f in _files(out) if not f.startswith(("_delta_log/", "_stfpm/lease-stale-"))] == live


def test_a_later_run_killed_before_its_commit_is_cleaned_up_and_a_committed_one_is_kept(tmp_path):
    out = tmp_path / "scores"
    with table_run(str(out), "r1", "plain") as run:
        committed = run.publish(_write(run, ["/a.png"]), pa.chunked_array([["/a.png"]]), {}, {})
    # r1 died after its log entry (its record is still there), r2 before its commit
    ScoresTable(str(out)).begin_run({"run_id": "r1"})
    orphan = _dead_run(out, "r2", ["/a.png", "/b.png"], status="error")
    assert read_scores(out).path.tolist() == ["/a.png"]  # the orphan is never read
    with table_run(str(out), "r3", "incremental") as run:
        assert run.recovered == {"r1": 0, "r2": 1} and not (out / orphan).exists()
    assert committed.version == DeltaTable(str(out)).version() and read_scores(out).path.tolist() == ["/a.png"]
    assert [f for f in _files(out) if f.endswith(".parquet")] == [
        os.path.basename(u) for u in DeltaTable(str(out)).file_uris()
    ]
    assert not (out / "_stfpm" / "runs").exists()


@pytest.mark.parametrize("name", ["part-00000.parquet", "20261207T010203Z-abcdef-00000.parquet"])
def test_data_files_without_a_run_record_are_not_ours_and_refused(tmp_path, name):
    """Only a recorded run's files are deleted; a run-like name alone proves nothing."""
    out = tmp_path / "scores"
    out.mkdir()
    write_data_files(_rows(["/a.png"], "x"), ScoresTable(str(out)).location, name.removesuffix(".parquet"))
    for mode in ("incremental", "overwrite"):
        with pytest.raises(FileExistsError, match=f"is not a scores table but holds {name}"):
            with table_run(str(out), "r1", mode):
                pytest.fail("a folder holding foreign files must be refused")
        assert _files(out) == [name]  # and nothing was created in it


def test_a_refused_run_leaves_no_trace(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(UserError, match="no checkpoint"):
        with table_run(str(out), "r1", "plain"):
            raise UserError("no checkpoint")  # a refusal after the lease: checkpoints, inputs
    assert not out.exists()
    with table_run(str(out), "r1", "plain") as run:
        run.publish(_write(run, ["/a.png"]), pa.chunked_array([["/a.png"]]), {}, {})
    shutil.rmtree(out / "_stfpm")
    before = _files(out)
    with pytest.raises(FileExistsError, match="already holds"):
        with table_run(str(out), "r2", "plain"):
            pass
    assert _files(out) == before and not (out / "_stfpm").exists()


def test_a_commit_that_failed_without_landing_is_cleaned_up_by_the_next_run(tmp_path, monkeypatch):
    """The failing run cannot know whether its commit landed, so it keeps its files and its record; the next
    run sees they are not live and deletes them."""
    out = tmp_path / "scores"

    def lost_commit(self, *args, **kwargs):
        raise OSError("connection reset before the log entry was written")

    monkeypatch.setattr(ScoresTable, "commit", lost_commit)
    with pytest.raises(OSError, match="connection reset"):
        with table_run(str(out), "r1", "plain") as run:
            run.publish(_write(run, ["/a.png"]), pa.chunked_array([["/a.png"]]), {}, {})
    assert (out / "r1-00000.parquet").exists() and (out / "_stfpm" / "runs" / "r1.json").exists()
    monkeypatch.undo()
    with table_run(str(out), "r2", "plain") as run:
        assert run.recovered == {"r1": 1} and not (out / "r1-00000.parquet").exists()
