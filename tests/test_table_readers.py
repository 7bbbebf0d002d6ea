"""The README's readers of the scores table (pandas via deltalake, Polars, DuckDB, one decoded map) run as
written, see only the live version, and a bare read_parquet of the folder is shown to be wrong."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
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
