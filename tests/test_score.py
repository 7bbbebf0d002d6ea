"""`stfpm-ray score` end to end on Ray: every image exactly once (odd files as error rows), scores equal to
the core's, incremental runs and retries, kills at every commit step, overlapping runs, a killed actor, odd
trees, inputs behind a pyarrow filesystem."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
import torch
import torch.nn.functional as F
from conftest import handmade_png, plain_folder, png_rgb16, quiet, read_scores
from deltalake import DeltaTable
from PIL import Image

from stfpm_ray import cli
from stfpm_ray.core.checkpoint import CheckpointMeta, _model_id, load_checkpoint
from stfpm_ray.core.score import DEFAULT_MAP_SIZE
from stfpm_ray.data.images import load_image
from stfpm_ray.data.mvtec import sample_for
from stfpm_ray.evaluate.evaluation import evaluate_scores
from stfpm_ray.ray.pipeline import ScoringOptions
from stfpm_ray.store.fs import register_filesystem
from stfpm_ray.store.lease import Lease
from stfpm_ray.store.scores import SCHEMA, ScoresTable
from stfpm_ray.workflows import score as score_workflow
from stfpm_ray.workflows.score import score_images


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_bomb(side: int) -> bytes:
    """A valid PNG header claiming side x side pixels: tiny file, 30 GB if decoded."""
    return handmade_png(side, side, 8, b"\0" * 64)


def _odd_files() -> dict[str, tuple[bytes, str | None]]:
    """File name -> (content, expected error fragment or None when it must score)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
    gradient = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (80, 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    valid = _encode(Image.fromarray(rgb))
    return {
        "zero.png": (b"", "empty"),
        "truncated.png": (valid[: len(valid) // 2], "corrupt or truncated"),
        "text.png": (b"this is a text file, not an image\n", "not a readable image"),
        "bomb.png": (_png_bomb(100_000), "decompression bomb"),
        "sixteen.png": (_encode(Image.fromarray(gradient.astype(np.uint16) * 257)), None),
        "sixteen_rgb.png": (png_rgb16(rgb.astype(np.uint16) * 257), None),
        "gray.png": (_encode(Image.fromarray(gradient)), None),
        "rgba.png": (_encode(Image.fromarray(np.dstack([rgb, gradient]))), None),
        "palette.png": (_encode(Image.fromarray(rgb).convert("P")), None),
        "cmyk.jpg": (_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90), None),
        "exif.jpg": (_encode(Image.fromarray(rgb), "JPEG", quality=90, exif=exif), None),
        "UPPER.PNG": (valid, None),
        "plain.bmp": (_encode(Image.fromarray(rgb), "BMP"), None),
        "plain.tif": (_encode(Image.fromarray(rgb), "TIFF"), None),
    }


@pytest.fixture(scope="module")
def archive(tmp_path_factory, synth_root, trained) -> Path:
    """A copy of the synthetic MVTec root with odd files among the first category's good test images."""
    root = tmp_path_factory.mktemp("archive") / "mvtec"
    shutil.copytree(synth_root, root)
    good = root / trained[1][0] / "test" / "good"
    for name, (content, _) in _odd_files().items():
        (good / name).write_bytes(content)
    (good / "notes.txt").write_text("not an image extension: never listed")
    (good / ".hidden.png").write_bytes(_odd_files()["UPPER.PNG"][0])
    return root


def _listed(root: Path) -> set[str]:
    return {
        str(p)
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in {".png", ".jpg", ".bmp", ".tif"}
        and not p.name.startswith(".")
        and p.parts[-3] not in ("ground_truth", "train")
    }


@pytest.fixture(scope="module")
def archive_run(ray_session, trained, archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "out"
    summary = score_images(trained[0], str(archive), out, ScoringOptions(batch_size=8), progress=quiet)
    return out, summary


def test_every_image_exactly_once_and_odd_files(archive_run, archive, trained):
    out, summary = archive_run
    table = DeltaTable(str(out)).to_pyarrow_table()
    frame = read_scores(out)
    assert len(frame) == table.num_rows == summary.rows_written
    assert table.schema.remove_metadata() == SCHEMA and set(frame.run_id) == {summary.run_id}
    paths = frame["path"].tolist()
    assert len(paths) == len(set(paths)) and set(paths) == _listed(archive)
    by_name = frame.set_index("path")
    good = archive / trained[1][0] / "test" / "good"
    for name, (_, error) in _odd_files().items():
        row = by_name.loc[str(good / name)]
        if error is None:
            assert row.status == "ok" and row.score > 0 and row.anomaly_map is not None, name
        else:
            assert row.status == "error" and error in row.error and pd.isna(row.score), (name, row.error)
            assert row.anomaly_map is None and pd.isna(row.map_scale)
    unserved = frame[frame.category == trained[1][2]]
    assert len(unserved) > 0 and (unserved.status == "error").all()
    assert unserved.error.str.contains("no checkpoint").all() and unserved.model_id.isna().all()
    served = frame[frame.category.isin(trained[1][:2])]
    assert (served.status == "ok").sum() == len(served) - 4  # the four unreadable files
    counts = summary.counts[trained[1][0]]
    assert (counts.ok, counts.error, counts.skipped) == ((frame.category == trained[1][0]).sum() - 4, 4, 0)
    # MVTec routing: label, defect and mask as the layout says
    for row in table.select(["path", "category", "label", "defect", "mask_path"]).to_pylist():
        sample = sample_for(row["path"])
        assert row == {**vars(sample), "path": row["path"]}
    assert sum(row["mask_path"] is not None for row in table.select(["mask_path"]).to_pylist()) > 0


def test_scores_equal_core_predict(archive_run, trained):
    out, _ = archive_run
    frame = read_scores(out)
    for category in trained[1][:2]:
        model, meta = load_checkpoint(trained[0] / category)
        rows = frame[(frame.category == category) & (frame.status == "ok")]
        images = torch.from_numpy(np.stack([load_image(p, meta.image_size) for p in rows.path])).permute(0, 3, 1, 2)
        maps, scores = model.predict(images)
        np.testing.assert_allclose(rows.score.to_numpy(), scores.numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(rows.score_norm.to_numpy(), scores.numpy() / meta.threshold, rtol=1e-4)
        decided = rows.is_anomalous.to_numpy(dtype=bool)
        assert (decided == (rows.score.to_numpy() > meta.threshold)).all()
        clear = np.abs(scores.numpy() - meta.threshold) > 1e-4 * meta.threshold  # validation images sit on it
        assert (decided[clear] == (scores.numpy() > meta.threshold)[clear]).all()
        assert set(rows.model_id) == {meta.model_id}


def test_docstring_lines_decode_the_map(archive_run, trained):
    out, _ = archive_run
    lines = re.search(r"decode one anomaly map\)::\n\n((?:    .+\n)+)", score_workflow.__doc__).group(1)
    assert len(lines.splitlines()) == 6
    scope = {"OUT_DIR": str(out)}
    exec(re.sub(r"(?m)^    ", "", lines), scope)  # noqa: S102 - the documented lines, run as written
    anomaly_map, row = scope["anomaly_map"], scope["row"]
    assert anomaly_map.shape == (DEFAULT_MAP_SIZE,) * 2 and anomaly_map.dtype == np.float32
    model, meta = load_checkpoint(trained[0] / row.category)
    image = torch.from_numpy(load_image(row.path, meta.image_size)).permute(2, 0, 1)[None]
    full, score = model.predict(image)
    expected = F.interpolate(full[:, None], size=anomaly_map.shape, mode="area")[0, 0].numpy()
    np.testing.assert_allclose(anomaly_map, expected, atol=float(row.map_scale) / 65535 + 1e-7)
    assert anomaly_map.max() == pytest.approx(row.map_scale, rel=1e-6) and row.map_scale <= row.score * (1 + 1e-5)


def test_rows_stay_small_and_manifest_describes_the_run(archive_run):
    out, summary = archive_run
    data = sorted(out.glob("*.parquet"))
    assert summary.files_written == len(data) and all(p.name.startswith(summary.run_id) for p in data)
    assert sorted(os.path.basename(u) for u in DeltaTable(str(out)).file_uris()) == [p.name for p in data]
    assert sum(p.stat().st_size for p in data) / summary.rows_written <= 40_000
    # the lease and the run's worker records are gone once the run has committed
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("_stfpm/**/*")) == []
    [latest, *_] = ScoresTable(str(out)).history()
    assert latest["version"] == summary.version == 0
    manifest = latest["manifest"]
    assert manifest["rows"] == summary.rows_written and manifest["mode"] == "plain"
    assert sum(f["rows"] for f in manifest["files"]) == summary.rows_written
    assert {w["pid"] for w in manifest["workers"]} and all(w["rows"] > 0 for w in manifest["workers"])


def _retag(folder: Path, **changes) -> None:
    """Edit a checkpoint's metadata as a retraining would, with the model_id that goes with it."""
    meta = CheckpointMeta(**{**json.loads((folder / "stfpm.json").read_text()), **changes})
    meta.model_id = _model_id((folder / "student.safetensors").read_bytes(), meta)
    (folder / "stfpm.json").write_text(json.dumps(dataclasses.asdict(meta)))


def _live_files(out: Path) -> list[str]:
    return sorted(os.path.basename(u) for u in DeltaTable(str(out)).file_uris())


def test_incremental_overwrite_and_refusal(ray_session, trained, synth_root, tmp_path, capsys):
    category = trained[1][0]
    inputs, out = tmp_path / "inbox", tmp_path / "out"
    first = plain_folder(inputs, synth_root, category, 6)
    base = ["score", "--checkpoints", str(trained[0]), "--input", str(inputs), "--out", str(out)]
    base += ["--category", category]
    assert cli.main([*base, "--score-batch-size", "4"]) == 0
    assert f"{category}" in capsys.readouterr().out

    assert cli.main(base) == 2  # plain rerun into a table is refused
    assert "--incremental" in capsys.readouterr().err

    new = plain_folder(inputs, synth_root, category, 3, start=6)
    summary = score_images(trained[0], str(inputs), out, category=category, incremental=True, progress=quiet)
    assert (summary.rows_written, summary.counts[category].skipped, summary.counts[category].ok) == (3, 6, 3)
    frame = read_scores(out)
    assert sorted(frame.path) == sorted(map(str, first + new)) and len(_live_files(out)) == 2
    assert summary.version == 1 and ScoresTable(str(out)).history()[0]["manifest"]["mode"] == "incremental"

    before = sorted(p.name for p in out.rglob("*"))
    assert cli.main([*base, "--incremental"]) == 0
    assert "nothing new to score" in capsys.readouterr().out
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written, not even a commit

    # a changed model (new model_id) rescores everything and keeps one row per path and model
    changed = tmp_path / "ckpt2" / category
    shutil.copytree(trained[0] / category, changed)
    meta = json.loads((changed / "stfpm.json").read_text())
    _retag(changed, threshold=meta["threshold"] * 2)  # another operating point: another model_id
    summary = score_images(changed.parent, str(inputs), out, category=category, incremental=True, progress=quiet)
    assert summary.rows_written == 9
    frame = read_scores(out)
    assert len(frame) == 18 and not frame.duplicated(["path", "model_id"]).any()
    # an earlier version evaluates with what made it: its rows and its runs' checkpoints only
    then = evaluate_scores(out, tmp_path / "report-v1", version=1, progress=None)["settings"]
    now = evaluate_scores(out, tmp_path / "report-now", progress=None)["settings"]
    assert (then["table_version"], then["checkpoints"]) == (1, [str(trained[0])])
    assert (now["table_version"], now["checkpoints"]) == (2, sorted([str(trained[0]), str(changed.parent)]))

    summary = score_images(trained[0], str(inputs), out, category=category, overwrite=True, progress=quiet)
    assert len(read_scores(out)) == 9 and len(_live_files(out)) == summary.files_written
    assert len(read_scores_version(out, 1)) == 9  # time travel: an earlier version stays readable

    # an error row is retried and replaced: truncated, then fixed, ends as one ok row
    broken = inputs / "truncated.png"
    broken.write_bytes(first[0].read_bytes()[:100])
    assert cli.main([*base, "--incremental"]) == 3  # a run that wrote error rows tells the scheduler so
    errors = read_scores(out).query("status == 'error'")
    assert list(errors.path) == [str(broken)]
    assert cli.main([*base, "--incremental"]) == 3  # still broken: retried, still one row
    assert (read_scores(out).path == str(broken)).sum() == 1
    broken.write_bytes(first[0].read_bytes())
    assert cli.main([*base, "--incremental"]) == 0
    frame = read_scores(out)
    row = frame[frame.path == str(broken)]
    assert len(row) == 1 and row.status.item() == "ok" and (frame.status == "ok").all() and len(frame) == 10


def read_scores_version(out: Path, version: int) -> pd.DataFrame:
    return DeltaTable(str(out), version=version).to_pandas()


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (the cleanup hooks are patched out)."""


def _dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _kill_at(monkeypatch, step: str) -> None:
    """Make the next run die at ``step`` without its cleanup, as a killed driver would."""
    monkeypatch.setattr(ScoresTable, "discard", lambda self, run_id: None)
    monkeypatch.setattr(Lease, "release", lambda self: None)
    original = {name: getattr(ScoresTable, name) for name in ("read_index", "retried_errors", "commit")}

    def after(name):
        def wrapped(self, *args, **kwargs):
            original[name](self, *args, **kwargs)
            raise _Killed(f"killed after {name}")

        return wrapped

    def before_commit(self, *args, **kwargs):
        raise _Killed("killed before the log entry")

    patched = {
        "data written": ("read_index", after("read_index")),
        "error files rewritten": ("retried_errors", after("retried_errors")),
        "before the log entry": ("commit", before_commit),
        "after the log entry": ("commit", after("commit")),
    }[step]
    monkeypatch.setattr(ScoresTable, patched[0], patched[1])


@pytest.mark.parametrize(
    "step", ["data written", "error files rewritten", "before the log entry", "after the log entry"]
)
def test_a_kill_at_each_commit_step_never_shows_doubles(ray_session, trained, synth_root, tmp_path, monkeypatch, step):
    """Readers see the previous version or the new one, never doubles; the next run takes over the dead
    run's lease and leaves exactly one ok row per image."""
    category = trained[1][0]
    inputs, out = tmp_path / "inbox", tmp_path / "out"
    images = plain_folder(inputs, synth_root, category, 4)
    (inputs / "broken.png").write_bytes(images[0].read_bytes()[:100])
    score_images(trained[0], str(inputs), out, category=category, progress=quiet)
    (inputs / "broken.png").write_bytes(images[0].read_bytes())  # fixed: the next run retries it
    plain_folder(inputs, synth_root, category, 2, start=4)

    _kill_at(monkeypatch, step)
    with pytest.raises(_Killed):
        score_images(trained[0], str(inputs), out, category=category, incremental=True, progress=quiet)
    monkeypatch.undo()
    frame = read_scores(out)
    assert not frame.path.duplicated().any()
    assert len(frame) == (7 if step == "after the log entry" else 5)

    lease = out / "_stfpm" / "lease.json"  # the killed driver's lease: make its pid a dead one
    lease.write_text(json.dumps({**json.loads(lease.read_text()), "pid": _dead_pid()}))
    messages: list[str] = []
    score_images(trained[0], str(inputs), out, category=category, incremental=True, progress=messages.append)
    assert any("took over the lease" in m for m in messages)
    frame = read_scores(out)
    assert len(frame) == 7 and not frame.path.duplicated().any() and (frame.status == "ok").all()


def test_a_second_run_is_refused_while_the_first_scores(ray_session, trained, synth_root, tmp_path):
    """The second run refuses at once naming the holder; the first run's files are untouched and it commits."""
    category = trained[1][0]
    inputs, out = tmp_path / "inbox", tmp_path / "out"
    images = plain_folder(inputs, synth_root, category, 12)
    result: dict = {}
    first = threading.Thread(
        target=lambda: result.update(
            summary=score_images(
                trained[0], str(inputs), out, ScoringOptions(batch_size=2), category=category, progress=quiet
            )
        )
    )
    first.start()
    deadline = time.time() + 120
    while not (out / "_stfpm" / "lease.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(FileExistsError, match=r"being written by run \S+ of .* \(pid \d+"):
        score_images(trained[0], str(inputs), out, category=category, incremental=True, progress=quiet)
    first.join(timeout=300)
    frame = read_scores(out)
    assert sorted(frame.path) == sorted(map(str, images)) and result["summary"].version == 0


def test_foreign_files_and_missing_checkpoints_are_refused(tmp_path, trained):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a scores table"):
        ScoresTable(str(tmp_path)).check_mode("overwrite")
    (tmp_path / "_manifests").mkdir()  # the plain-Parquet layout of earlier versions
    with pytest.raises(FileExistsError, match="earlier stfpm-ray"):
        ScoresTable(str(tmp_path)).check_mode("incremental")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        score_images(tmp_path, str(tmp_path), tmp_path / "o", progress=quiet)
    with pytest.raises(ValueError, match="no usable checkpoint for category"):
        score_images(trained[0], str(tmp_path), tmp_path / "o", category="nope", progress=quiet)


def test_killed_scoring_actor_loses_and_duplicates_nothing(ray_session, trained, tmp_path):
    """SIGKILL the scoring actor after its first batch: Ray restarts it, every image is written once."""
    category = trained[1][0]
    inputs, out = tmp_path / "inbox", tmp_path / "out"
    # the same student run at 256 px is slow enough on CPU that the run outlives the kill
    slow = tmp_path / "ckpt" / category
    shutil.copytree(trained[0] / category, slow)
    _retag(slow, image_size=256)
    inputs.mkdir()
    rng = np.random.default_rng(1)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(inputs / f"{i:02d}.png")
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(
            summary=score_images(
                slow.parent, str(inputs), out, ScoringOptions(batch_size=2), category=category, progress=quiet
            )
        )
    )
    worker.start()
    killed = None
    deadline = time.time() + 180
    while killed is None and time.time() < deadline and worker.is_alive():
        for record in out.glob("_stfpm/runs/*/*.json"):
            try:
                info = json.loads(record.read_text())
            except (OSError, ValueError):  # being replaced right now
                continue
            if info["rows"] > 0:
                os.kill(info["pid"], signal.SIGKILL)
                killed = info["pid"]
                break
        time.sleep(0.05)
    worker.join(timeout=300)
    assert killed is not None, "the run finished before its actor could be killed"
    frame = read_scores(out)
    assert sorted(frame.path) == sorted(str(p) for p in inputs.iterdir()) and (frame.status == "ok").all()
    workers = ScoresTable(str(out)).history()[0]["manifest"]["workers"]
    assert killed in {w["pid"] for w in workers}
    assert sum(w["rows"] for w in workers if w["pid"] != killed) > 0  # a restarted process took over


def test_an_mvtec_root_behind_a_pyarrow_filesystem_keeps_masks_and_pixel_metrics(
    ray_session, trained, synth_root, tmp_path
):
    """An ``s3://``-style root: every path is ``scheme://...`` text, read through a pyarrow filesystem."""
    category = trained[1][0]
    register_filesystem("mvtec-test", pafs.SubTreeFileSystem(str(synth_root), pafs.LocalFileSystem()))
    results = {}
    for name, source in (("local", str(synth_root / category / "test")), ("uri", f"mvtec-test://{category}/test")):
        score_images(trained[0], source, tmp_path / name / "scores", progress=quiet)
        results[name] = evaluate_scores(tmp_path / name / "scores", tmp_path / name / "report", progress=quiet)
    frame = read_scores(tmp_path / "uri" / "scores")
    defective = frame[frame.label == 1]
    assert len(defective) and defective.mask_path.str.startswith(f"mvtec-test://{category}/ground_truth/").all()
    local, uri = results["local"]["categories"][category], results["uri"]["categories"][category]
    assert not math.isnan(uri["pixel_auroc"]) and not math.isnan(uri["aupro"])
    assert (uri["pixel_auroc"], uri["aupro"], uri["image_auroc"]) == (
        local["pixel_auroc"],
        local["aupro"],
        local["image_auroc"],
    )


def test_an_odd_tree_and_a_tampered_checkpoint(ray_session, trained, synth_root, tmp_path, capsys):
    """Symlink loops, a link to a file already listed, a dangling link and a name that is not UTF-8 in the
    input; one category's weights swapped for another's. The run ends, every real file has one row, the
    odd names and the broken category are error rows with their reasons, and the exit status says so."""
    good, bad = trained[1][:2]
    checkpoints = tmp_path / "ckpt"
    shutil.copytree(trained[0], checkpoints)
    shutil.copy(trained[0] / good / "student.safetensors", checkpoints / bad / "student.safetensors")
    root = tmp_path / "in"
    for category in (good, bad):
        shutil.copytree(synth_root / category / "test", root / category / "test")
    folder = root / good / "test" / "good"
    real = sorted(folder.glob("*.png"))
    (folder / "loop").symlink_to(".")
    (root / "up").symlink_to("..")
    (folder / "again.png").symlink_to(real[0].name)
    (folder / "gone.png").symlink_to("missing.png")
    os.close(os.open(os.fsencode(folder) + b"/caf\xe9.png", os.O_CREAT | os.O_WRONLY))
    os.mkfifo(folder / "pipe.png")
    out = tmp_path / "out"
    status = cli.main(["score", "--checkpoints", str(checkpoints), "--input", str(root), "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 3
    [line] = [m for m in printed.splitlines() if "unusable" in m]
    assert f"{checkpoints / bad / 'student.safetensors'}" in line and "model_id" in line
    frame = read_scores(out)
    assert not frame.path.duplicated().any()
    expected = {
        str(p)
        for p in root.rglob("*.png")
        if p.is_file() and not p.is_symlink() and str(p).isprintable() and "\udce9" not in str(p)
    }
    assert expected <= set(frame.path)
    errors = frame[frame.status == "error"].set_index("path").error
    assert "dangling symbolic link" in errors[str(folder / "gone.png")]
    assert "not valid UTF-8" in errors[str(folder) + "/caf\\xe9.png"]
    broken = frame[frame.category == bad]
    assert len(broken) and (broken.status == "error").all() and broken.error.str.contains("model_id").all()
    assert (frame[(frame.category == good) & frame.path.isin(expected)].status == "ok").all()
    assert set(frame.path) - expected == {str(folder / "gone.png"), str(folder) + "/caf\\xe9.png"}
    assert "skipped" in printed and "directory symlinks" in printed and "FIFOs" in printed
