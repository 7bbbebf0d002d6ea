"""Publishing a run (stfpm_ray.store.publish): one commit of exactly one row per planned image, the run's own
files removed when it fails before its commit and kept once the commit has begun, the lease held throughout."""

from __future__ import annotations

import pyarrow as pa
import pytest
from conftest import read_scores
from deltalake import DeltaTable

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
