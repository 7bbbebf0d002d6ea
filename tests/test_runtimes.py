"""`--runtime` (stfpm_ray.core.runtimes): scoring with each category's exported graph in onnxruntime or OpenVINO
flags what PyTorch flags and the rows say which runtime scored them; `auto` measures; what cannot run as asked
is refused in one line; tables written before the `runtime` column gain it and keep reading, checking and
compacting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import need, quiet, read_scores
from deltalake import DeltaTable

from stfpm_ray import cli
from stfpm_ray.core import runtimes
from stfpm_ray.core.checkpoint import discover_checkpoints
from stfpm_ray.core.export import installed
from stfpm_ray.errors import UserError
from stfpm_ray.ray.pipeline import ScoringOptions
from stfpm_ray.store.fs import resolve
from stfpm_ray.store.graph_cache import GraphCache
from stfpm_ray.store.scores import ADDED_COLUMNS, SCHEMA
from stfpm_ray.workflows.score import score_images
from stfpm_ray.workflows.table import check_table, compact_table

EXPORTED = [name for name in runtimes.EXPORTED if installed(name)]


@pytest.fixture(scope="module")
def scored(ray_session, trained, synth_root, tmp_path_factory):
    """The test images of the trained categories scored once with each runtime: {runtime: rows by path}."""
    data = tmp_path_factory.mktemp("data")
    for name in trained[1][:2]:
        shutil.copytree(synth_root / name / "test", data / name / "test")
    frames = {}
    for runtime in ("torch", *EXPORTED):
        out = tmp_path_factory.mktemp(runtime) / "scores"
        score_images(trained[0], str(data), out, ScoringOptions(batch_size=8, runtime=runtime), progress=quiet)
        frames[runtime] = read_scores(out).set_index("path").sort_index()
    return frames


@pytest.mark.parametrize("runtime", runtimes.EXPORTED)
def test_an_exported_graph_flags_the_images_pytorch_flags_and_the_rows_say_which_scored(scored, trained, runtime):
    need(runtime in EXPORTED, f"needs {runtime} (the test extra installs it)")
    torch_rows, rows = scored["torch"], scored[runtime]
    assert list(torch_rows.index) == list(rows.index) and len(torch_rows) >= 20
    assert set(torch_rows.runtime) == {"torch"} and set(rows.runtime) == {runtime}
    assert (torch_rows.is_anomalous == rows.is_anomalous).all()
    thresholds = {name: meta.threshold for name, (_, meta) in discover_checkpoints(trained[0])[0].items()}
    tolerance = np.array([1e-4 * thresholds[c] for c in torch_rows.category])
    assert (np.abs(torch_rows.score.to_numpy() - rows.score.to_numpy()) <= tolerance).all()


def test_auto_measures_and_keeps_the_fastest(trained, monkeypatch):
    need(bool(EXPORTED), "needs stfpm-ray[onnx] or [openvino]")
    found = dict(list(discover_checkpoints(trained[0])[0].items())[:1])
    fp32 = dict.fromkeys(found, "fp32")
    for fastest in ("torch", *EXPORTED):
        rates = {name: 30.0 if name == fastest else 10.0 for name in ("torch", *EXPORTED)}
        monkeypatch.setattr(runtimes, "measure_rates", lambda *args, rates=rates: rates)
        choice = runtimes.choose_runtime("auto", "cpu", fp32, found, threads=1)
        assert choice.runtime == fastest and "measured" in choice.reason, choice
        assert bool(choice.graphs) == (fastest != "torch")
    monkeypatch.undo()
    rates = runtimes.measure_rates(*_model_and_graph(found), threads=1, runtimes=EXPORTED)
    assert set(rates) == {"torch", *EXPORTED} and min(rates.values()) > 0


def _model_and_graph(found: dict) -> tuple:
    from stfpm_ray.core.export import export_onnx
    from stfpm_ray.core.score import ScoringModels

    model, meta = ScoringModels(found)(next(iter(found)))
    return model, export_onnx(model, meta.input_size), meta.input_size


def test_what_exported_graphs_cannot_run_is_torch_under_auto_and_refused_when_asked(trained, monkeypatch):
    found = dict(list(discover_checkpoints(trained[0])[0].items())[:1])
    name = next(iter(found))
    for device, precision, why in (("cuda", "fp32", "GPUs"), ("cpu", "bf16", "bf16")):
        choice = runtimes.choose_runtime("auto", device, {name: precision}, found, threads=1)
        assert choice.runtime == "torch" and why in choice.reason and not choice.graphs
        for runtime in runtimes.EXPORTED:
            with pytest.raises(UserError, match=f"--runtime {runtime} runs fp32 on CPUs, but .*{why}"):
                runtimes.choose_runtime(runtime, device, {name: precision}, found, threads=1)
    assert runtimes.choose_runtime("torch", "cpu", {name: "fp32"}, found, 1).runtime == "torch"
    monkeypatch.setattr("stfpm_ray.core.export.importlib.util.find_spec", lambda module: None)
    choice = runtimes.choose_runtime("auto", "cpu", {name: "fp32"}, found, threads=1)
    assert choice.runtime == "torch" and "stfpm-ray[onnx]" in choice.reason and "[openvino]" in choice.reason
    with pytest.raises(UserError, match="--runtime must be one of"):
        ScoringOptions(runtime="tensorrt")


def test_what_cannot_run_is_one_line_before_anything_runs(trained, synth_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "scores"
    argv = ["score", "--checkpoints", str(trained[0]), "--input", str(synth_root / trained[1][0]), "--out", str(out)]
    for flags in (["--precision", "bf16"], ["--gpus-per-actor", "1"]):
        assert cli.main([*argv, "--runtime", "onnxruntime", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "runs fp32 on CPUs" in err[0], err
    monkeypatch.setattr("stfpm_ray.core.export.importlib.util.find_spec", lambda module: None)
    for runtime, extra in (("onnxruntime", "onnx"), ("openvino", "openvino")):
        assert cli.main([*argv, "--runtime", runtime]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pip install 'stfpm-ray[{extra}]'" in err[0], err
    assert not out.exists()


def test_a_nightly_exports_once_and_a_damaged_kept_graph_is_exported_again(
    ray_session, trained, synth_root, tmp_path, monkeypatch
):
    """The graph a run exports is kept beside its table: the next run into the table scores the same rows
    without exporting; a kept graph that no longer loads is exported again and replaced, not fatal."""
    need(bool(EXPORTED), "needs stfpm-ray[onnx] or [openvino]")
    runtime, name = EXPORTED[0], trained[1][0]
    data, out = tmp_path / "data", tmp_path / "scores"
    shutil.copytree(synth_root / name / "test", data / name / "test")
    options = ScoringOptions(batch_size=8, runtime=runtime)
    score_images(trained[0], str(data), out, options, progress=quiet)
    kept = list((out / "_stfpm" / "graphs").rglob("*.onnx"))
    assert [path.parent.name for path in kept] == [name]
    exports = []
    real_export = runtimes.export_onnx
    monkeypatch.setattr(runtimes, "export_onnx", lambda *args: exports.append(args) or real_export(*args))
    score_images(trained[0], str(data), out, options, overwrite=True, progress=quiet)
    assert exports == [] and list((out / "_stfpm" / "graphs").rglob("*.onnx")) == kept
    first = read_scores(out).set_index("path").sort_index()
    kept[0].write_bytes(b"half a graph")
    score_images(trained[0], str(data), out, options, overwrite=True, progress=quiet)
    assert len(exports) == 1 and kept[0].read_bytes() != b"half a graph"
    again = read_scores(out).set_index("path").sort_index()
    np.testing.assert_allclose(again.score, first.score, rtol=1e-6)
    assert set(again.runtime) == {runtime}


def test_a_category_keeps_one_graph(tmp_path):
    cache = GraphCache(resolve(str(tmp_path)))
    cache.put("screw", "model-a", b"a")
    cache.put("screw.v2", "model-a", b"other category")
    cache.put("screw", "model-b", b"b")
    assert cache.get("screw", "model-a") is None and cache.get("screw", "model-b") == b"b"
    assert cache.get("screw.v2", "model-a") == b"other category"


def test_a_table_from_before_the_runtime_column_gains_it_and_stays_whole(ray_session, trained, synth_root, tmp_path):
    """A table written by a version without ``runtime`` (rebuilt here by dropping the column from a fresh one):
    the next run's commit declares the column, the old rows read as null, `table check` finds it healthy and a
    compaction merges old and new files."""
    data = tmp_path / "data"
    name = trained[1][0]
    shutil.copytree(synth_root / name / "test", data / name / "test")
    out = tmp_path / "scores"
    score_images(trained[0], str(data), out, ScoringOptions(batch_size=8), progress=quiet)
    _drop_added_columns(out)
    assert {f.name for f in DeltaTable(str(out)).schema().fields}.isdisjoint(ADDED_COLUMNS)
    old_rows = len(read_scores(out))
    good = data / name / "test" / "good"
    (good / "again.png").write_bytes(next(good.glob("*.png")).read_bytes())
    score_images(trained[0], str(data), out, ScoringOptions(batch_size=8), incremental=True, progress=quiet)
    frame = read_scores(out)
    assert len(frame) == old_rows + 1
    assert frame.runtime.isna().sum() == old_rows and set(frame.runtime.dropna()) == {"torch"}
    assert check_table(str(out), progress=quiet).healthy
    merged, _ = compact_table(str(out), progress=quiet)
    frame = read_scores(out)
    assert merged >= 2 and len(frame) == old_rows + 1 and frame.runtime.isna().sum() == old_rows


def _drop_added_columns(out: Path) -> None:
    """Rewrite a table as a version before ``ADDED_COLUMNS`` wrote it: data files and log schema without them."""
    for path in out.glob("*.parquet"):
        rows = pq.read_table(path)
        pq.write_table(rows.drop_columns(list(ADDED_COLUMNS)), path)
    old = pa.schema([field for field in SCHEMA if field.name not in ADDED_COLUMNS])
    for entry in sorted((out / "_delta_log").glob("*.json")):
        lines = []
        for line in entry.read_text().splitlines():
            action = json.loads(line)
            if "metaData" in action:
                schema = json.loads(action["metaData"]["schemaString"])
                schema["fields"] = [f for f in schema["fields"] if f["name"] in old.names]
                action["metaData"]["schemaString"] = json.dumps(schema)
            if "add" in action:
                action["add"]["size"] = (out / action["add"]["path"]).stat().st_size
                stats = json.loads(action["add"].get("stats") or "{}")
                for key in ("minValues", "maxValues", "nullCount"):
                    for column in ADDED_COLUMNS:
                        stats.get(key, {}).pop(column, None)
                action["add"]["stats"] = json.dumps(stats)
            lines.append(json.dumps(action))
        entry.write_text("\n".join(lines) + "\n")
