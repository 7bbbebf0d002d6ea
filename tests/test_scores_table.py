"""The scores table as its readers see it: the README's readers (pandas via deltalake, Polars, DuckDB, one
decoded map) run as written and see only the live version (a bare read_parquet of the folder is shown to be
wrong), and filtered reads skip files by the statistics each commit records."""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import read_scores
from PIL import Image

from stfpm_ray.store.scores import SCHEMA, ScoresTable, write_data_files

README = Path(__file__).resolve().parents[1] / "README.md"


def _rows(paths: list[str], run_id: str, status: str = "ok") -> pa.Table:
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(png, format="PNG")
    n = len(paths)
    columns = {field.name: pa.nulls(n, field.type) for field in SCHEMA}
    ok = status == "ok"
    columns.update(
        path=pa.array(paths),
        category=pa.array(["c"] * n),
        model_id=pa.array(["m"] * n),
        run_id=pa.array([run_id] * n),
        status=pa.array([status] * n),
        score=pa.array([2.0] * n, pa.float32()),
        is_anomalous=pa.array([ok] * n),
        map_scale=pa.array([0.5 if ok else None] * n, pa.float32()),
        anomaly_map=pa.array([png.getvalue() if ok else None] * n, pa.binary()),
        error=pa.array([None if ok else "truncated"] * n, pa.string()),
    )
    return pa.table(columns, schema=SCHEMA)


def _snippets() -> list[str]:
    section = README.read_text().split("### The scores table", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_readers_see_only_the_live_version(tmp_path):
    out = tmp_path / "scores"
    out.mkdir()
    table = ScoresTable(str(out))
    first = write_data_files(
        pa.concat_tables([_rows(["/a.png", "/b.png"], "r1"), _rows(["/c.png"], "r1", "error")]),
        table.location,
        "r1-00000",
    )
    table.commit(first, [], {"run_id": "r1"}, overwrite=False)
    # the retry of /c.png replaces its error row in the same commit that adds its ok row
    removed, kept = table.retried_errors(pa.array(["/c.png"]), "r2")
    second = write_data_files(_rows(["/c.png"], "r2"), table.location, "r2-00000")
    assert table.commit(second + kept, removed, {"run_id": "r2"}, overwrite=False) == 1
    assert len(pd.read_parquet(out)) == 4  # the folder still holds the replaced error file: wrong for a table

    snippets = _snippets()
    assert len(snippets) == 4
    for code in snippets[:2]:
        scope = {"OUT_DIR": str(out)}
        exec(code, scope)  # noqa: S102 - the documented lines, run as written
        frame = scope["scores"]
        frame = frame if isinstance(frame, pd.DataFrame) else frame.to_pandas()
        assert sorted(frame["path"]) == ["/a.png", "/b.png", "/c.png"] and (frame["status"] == "ok").all()
    scope = {"OUT_DIR": str(out)}
    exec(snippets[2], scope)  # noqa: S102
    assert scope["flagged"].to_dict("records") == [{"category": "c", "n": 3}]
    scope = {"OUT_DIR": str(out)}
    exec(snippets[3], scope)  # noqa: S102
    assert scope["anomaly_map"].shape == (8, 8) and np.allclose(scope["anomaly_map"], 0.5)
    history = table.history()
    assert [h["manifest"]["run_id"] for h in history] == ["r2", "r1"]


def _with(rows: pa.Table, **columns: pa.Array) -> pa.Table:
    for name, values in columns.items():
        rows = rows.set_column(SCHEMA.get_field_index(name), name, values)
    return rows


def _night(table: ScoresTable) -> None:
    """Three data files as a run writes them: two categories' ok rows, one file of error rows."""
    bottle = _with(
        _rows(["/b/1.png", "/b/2.png"], "r1"),
        category=pa.array(["bottle"] * 2),
        score=pa.array([0.7] * 2, pa.float32()),
    )
    screw = _with(_rows(["/s/1.png"], "r1"), category=pa.array(["screw"]), score=pa.array([0.2], pa.float32()))
    failed = _with(_rows(["/s/2.png"], "r1", "error"), category=pa.array(["screw"]))
    files = [
        file
        for rows in (bottle, screw, failed)
        for file in write_data_files(rows, table.location, f"r1-{rows['path'][0].as_py()[1]}")
    ]
    table.commit(files, [], {"run_id": "r1"}, overwrite=False)


@pytest.mark.parametrize(
    "where, files",
    [
        (pc.field("category") == "bottle", 1),
        (pc.field("path") >= "/s/", 2),
        (pc.field("status") == "error", 1),
        (pc.field("model_id") == "other", 0),
        (pc.field("score") > 0.5, 2),
        (pc.field("error").is_null(), 2),
        (pc.field("is_anomalous") == True, 2),  # noqa: E712 - an Arrow expression, not a Python comparison
        (pc.field("label").is_null(), 3),
    ],
)
def test_filtered_reads_skip_files_by_their_statistics_and_return_what_a_full_read_does(tmp_path, where, files):
    """Each data file's log entry carries its columns' ranges: a reader that filters opens only the files
    whose range can match, and still returns exactly the rows a full read then filtered would."""
    from deltalake import DeltaTable

    table = ScoresTable(str(tmp_path / "scores"))
    (tmp_path / "scores").mkdir()
    _night(table)
    dataset = DeltaTable(str(tmp_path / "scores")).to_pyarrow_dataset()
    assert len(list(dataset.get_fragments())) == 3
    assert len(list(dataset.get_fragments(filter=where))) == files
    expected = dataset.to_table().filter(where).sort_by("path")
    assert dataset.to_table(filter=where).sort_by("path").equals(expected)
    polars = pytest.importorskip("polars")
    assert polars.scan_delta(str(tmp_path / "scores")).filter(polars.col("category") == "screw").collect().height == 2


def test_a_file_with_a_value_json_cannot_hold_gets_no_ranges_and_is_read_whole(tmp_path):
    from deltalake import DeltaTable

    table = ScoresTable(str(tmp_path / "scores"))
    (tmp_path / "scores").mkdir()
    rows = _rows(["/a.png", "/b.png"], "r1")
    rows = rows.set_column(SCHEMA.get_field_index("score"), "score", pa.array([0.7, math.inf], pa.float32()))
    [written] = write_data_files(rows, table.location, "r1-00000")
    assert json.loads(written.stats) == {"numRecords": 2}
    table.commit([written], [], {"run_id": "r1"}, overwrite=False)
    dataset = DeltaTable(str(tmp_path / "scores")).to_pyarrow_dataset()
    assert dataset.to_table(filter=pc.field("score") > 0.5).num_rows == 2


def _live_files(out: Path) -> list[str]:
    from deltalake import DeltaTable

    return sorted(os.path.basename(u) for u in DeltaTable(str(out)).file_uris())


def test_error_files_beyond_the_limit_are_merged_into_one_in_the_retrying_commit(tmp_path, monkeypatch):
    from stfpm_ray.store import scores as scores_module
    from stfpm_ray.store.scores import write_data_files

    monkeypatch.setattr(scores_module, "MAX_ERROR_FILES", 4)
    table = ScoresTable(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()

    def night(run: str, names: list[str]) -> list:
        rows = [
            {
                "path": f"/archive/{name}",
                "category": "c",
                "model_id": "m",
                "run_id": run,
                "status": "error",
                "error": "cannot decode",
            }
            for name in names
        ]
        return [
            f
            for i, row in enumerate(rows)
            for f in write_data_files(pa.Table.from_pylist([row], SCHEMA), table.location, f"{run}-{i}")
        ]

    table.commit(night("r0", ["a", "b", "c"]), [], {}, overwrite=False)
    removed, kept = table.retried_errors(pa.array(["/archive/a"]), "r1")  # three files: within the limit
    assert removed == ["r0-0-errors.parquet"] and kept == []
    table.commit(night("r1", ["a", "d", "e"]), removed, {}, overwrite=False)
    assert len(_live_files(tmp_path / "out")) == 5
    removed, kept = table.retried_errors(pa.array(["/archive/e"]), "r2")  # five: merged
    assert len(removed) == 5 and len(kept) == 1 and kept[0].rows == 4
    table.commit(kept, removed, {}, overwrite=False)
    frame = read_scores(tmp_path / "out")
    assert sorted(frame.path) == [f"/archive/{n}" for n in "abcd"] and len(_live_files(tmp_path / "out")) == 1
