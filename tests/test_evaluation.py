"""Evaluation of a scores table: metrics against direct computations, row accounting, the deployed operating
point, report outputs, and an unlabelled (nightly) table."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_scores
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from stfpm_ray import cli
from stfpm_ray.core.checkpoint import META_FILE, CheckpointMeta, add_operating_point, read_meta
from stfpm_ray.data.images import load_mask
from stfpm_ray.evaluate.evaluation import N_FLAGGED, evaluate_scores
from stfpm_ray.evaluate.metrics import aupro_exact, f1_max, operating_point
from stfpm_ray.evaluate.report import PAPER_STFPM
from stfpm_ray.store.mapcodec import decode_map, encode_map
from stfpm_ray.store.scores import SCHEMA, DataFile, ScoresTable, file_stats, write_data_files

MAP_SIZE = 32
IMAGE_SIZE = 64
NEW_MODEL, OLD_MODEL = "a1b2c3d4e5f60718", "0f0f0f0f0f0f0f0f"
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
# The deployed threshold of NEW_MODEL: between good and defective scores, so both sides have errors.
THRESHOLD = 0.24
CALIBRATION = {"method": "lognormal-t", "target_far": 0.01, "n_val": 8, "log_mean": -1.6, "log_std": 0.1}


def _row(path, category, label, mask_path, anomaly_map, score, model, when, defect=None, threshold=THRESHOLD) -> dict:
    png, scale = encode_map(anomaly_map)
    return dict(
        path=str(path),
        category=category,
        score=score,
        score_norm=score / threshold,
        is_anomalous=score > threshold,
        label=label,
        defect=defect,
        mask_path=mask_path and str(mask_path),
        anomaly_map=png,
        map_scale=scale,
        model_id=model,
        scored_at=when,
        status="ok",
        error=None,
    )


def _error_row(path, category, model) -> dict:
    failure = dict(path=str(path), category=category, label=1, model_id=model, scored_at=T0, status="error")
    return {name: None for name in SCHEMA.names} | failure | {"error": "corrupt or truncated image"}


def _write_mask(path: Path, rng: np.random.Generator) -> None:
    """A full-resolution 8-bit mask with one or two rectangular defects."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for _ in range(rng.integers(1, 3)):
        y, x = rng.integers(4, IMAGE_SIZE - 20, 2)
        h, w = rng.integers(6, 16, 2)
        mask[y : y + h, x : x + w] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def _map(rng: np.random.Generator, mask: np.ndarray | None, strength: float) -> np.ndarray:
    """Smooth positive noise, raised inside the (map-size) mask; some hot spots on good pixels too."""
    base = ndimage.gaussian_filter(rng.gamma(2.0, 0.05, (MAP_SIZE, MAP_SIZE)), 1.0)
    if mask is not None:
        base = base + strength * ndimage.gaussian_filter(mask.astype(float), 1.0)
    return base.astype(np.float32)


def _image(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(path)


def commit_rows(out: Path, runs: list[tuple[list[dict], dict]]) -> Path:
    """A Delta scores table: one commit per (rows, manifest), written as a scoring run writes it."""
    out.mkdir()
    table = ScoresTable(str(out))
    for rows, manifest in runs:
        files = write_data_files(pa.Table.from_pylist(rows, schema=SCHEMA), table.location, manifest["run_id"])
        table.commit(files, [], manifest, overwrite=False)
    (out / "_manifest.json").write_text("{}")  # readers skip names starting with "_", and the log decides anyway
    return out


def write_checkpoint_meta(folder: Path, category: str, model: str, threshold: float, calibration: dict) -> None:
    """The metadata of a checkpoint that scored ``model``: all that evaluate reads of it."""
    meta = CheckpointMeta(
        category=category,
        backbone="tf_efficientnet_lite0",
        layers=[1, 2, 3],
        image_size=64,
        teacher_source="offline",
        teacher_sha256="0" * 64,
        threshold=threshold,
        normalization={},
        calibration=calibration,
        model_id=model,
    )
    folder.mkdir(parents=True)
    (folder / META_FILE).write_text(json.dumps(asdict(meta)))


def _category_rows(root: Path, category: str, n_good: int, n_defective: int, rng: np.random.Generator) -> list[dict]:
    """Good, defective (crack and scratch alternating), two unlabelled rows (one flagged) and an error row;
    widget also holds an older model's rows of its labelled images."""
    rows = []
    for i in range(n_good + n_defective + 2):
        label = 0 if i < n_good else 1 if i < n_good + n_defective else None
        image = root / "data" / category / f"{i:03d}.png"
        if i != n_good:  # the first defective image stays unreadable: its overlay shows the map alone
            _image(image, rng)
        mask_path = None
        if label == 1:
            mask_path = root / "data" / category / "ground_truth" / f"{i:03d}_mask.png"
            _write_mask(mask_path, rng)
        mask = load_mask(mask_path, MAP_SIZE) if mask_path else None
        anomaly_map = _map(rng, mask, strength=0.0 if i == n_good else rng.uniform(0.05, 0.3))
        score = float(anomaly_map.max() * rng.uniform(1.0, 1.3))
        if label is None:
            score = THRESHOLD * (1.5 if i == n_good + n_defective else 0.5)
        defect = ("crack", "scratch")[i % 2] if label == 1 else "good" if label == 0 else None
        rows.append(_row(image, category, label, mask_path, anomaly_map, score, NEW_MODEL, T0, defect))
        if category == "widget" and label is not None:
            older = _map(rng, None, 0.0)  # another model's row of the same image: must not count
            old_score, before = float(older.max()), T0 - timedelta(days=3)
            rows.append(_row(image, category, label, mask_path, older, old_score, OLD_MODEL, before, defect, 0.2))
    rows.append(_error_row(root / "data" / category / "broken.png", category, NEW_MODEL))
    return rows


def build_scores(root: Path) -> Path:
    """Scores of three categories in two commits, with image, mask and checkpoint files on disk.

    bottle (paper numbers exist, checkpoint reachable) and widget (no checkpoint: threshold from the rows):
    6 good, 6 defective, 2 unlabeled, 1 error each; widget also holds an older model's rows and an older
    repeat of one image. solo: good images only.
    """
    rng = np.random.default_rng(7)
    rows = [
        row
        for category, n_good, n_defective in (("bottle", 6, 6), ("widget", 6, 6), ("solo", 4, 0))
        for row in _category_rows(root, category, n_good, n_defective, rng)
    ]
    repeat = dict(rows[-20])  # an older repeat of a widget image by the same model: the newest row counts
    assert repeat["category"] == "widget" and repeat["model_id"] == NEW_MODEL
    rows.append(repeat | {"score": 1e3, "scored_at": T0 - timedelta(hours=1)})
    write_checkpoint_meta(root / "ckpt" / "bottle", "bottle", NEW_MODEL, THRESHOLD, CALIBRATION)
    half = len(rows) // 2
    manifest = {
        "checkpoints": str(root / "ckpt"),
        "inputs": [str(root / "data")],
        "model_ids": {"bottle": NEW_MODEL, "widget": NEW_MODEL, "solo": NEW_MODEL},
    }
    return commit_rows(
        root / "scores", [(rows[:half], {**manifest, "run_id": "r1"}), (rows[half:], {**manifest, "run_id": "r2"})]
    )


def reference(scores_dir: Path, category: str, model: str) -> dict:
    """Direct computation on the decoded maps and masks of a category's newest rows of ``model``."""
    table = read_scores(scores_dir)
    table = table[(table["category"] == category) & (table["model_id"] == model)]
    table = table.sort_values("scored_at").drop_duplicates("path", keep="last")
    labelled = table[(table["status"] == "ok") & table["label"].notna()]
    labels = labelled["label"].to_numpy(dtype=int)
    scores = labelled["score"].to_numpy(dtype=float)
    maps = np.stack([decode_map(png, scale) for png, scale in zip(labelled["anomaly_map"], labelled["map_scale"])])
    masks = np.stack([load_mask(path if isinstance(path, str) else None, MAP_SIZE) for path in labelled["mask_path"]])
    f1, threshold = f1_max(labels, scores) if labels.any() else (math.nan, math.nan)
    both = labels.any() and not labels.all()
    flagged = labelled["is_anomalous"].to_numpy(dtype=bool)
    return {
        "image_auroc": roc_auc_score(labels, scores) if both else math.nan,
        "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()) if masks.any() else math.nan,
        "aupro": aupro_exact(maps, masks, 0.3),
        "image_f1_max": f1,
        "image_f1_threshold": threshold,
        "tp": int((flagged & (labels == 1)).sum()),
        "fp": int((flagged & (labels == 0)).sum()),
        "tn": int((~flagged & (labels == 0)).sum()),
        "fn": int((~flagged & (labels == 1)).sum()),
        "defects": labelled["defect"].to_numpy(dtype=object),
        "labels": labels,
        "flagged": flagged,
    }


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Path, Path, dict, list[str]]:
    root = tmp_path_factory.mktemp("evaluate")
    scores = build_scores(root)
    messages: list[str] = []
    result = evaluate_scores(scores, root / "report", progress=messages.append)
    return scores, root / "report", result, messages


def _close(actual, expected, tolerance: float) -> bool:
    if expected is None or math.isnan(expected):
        return actual is None
    return actual is not None and abs(actual - expected) <= tolerance


@pytest.mark.parametrize("category", ["bottle", "widget", "solo"])
def test_metrics_equal_direct_computation(evaluated, category: str) -> None:
    scores, report_dir, _, _ = evaluated
    written = json.loads((report_dir / "metrics.json").read_text())["categories"][category]
    expected = reference(scores, category, NEW_MODEL)
    assert _close(written["image_auroc"], expected["image_auroc"], 1e-9)
    assert _close(written["image_f1_max"], expected["image_f1_max"], 1e-9)
    assert _close(written["image_f1_threshold"], expected["image_f1_threshold"], 1e-6)
    assert _close(written["pixel_auroc"], expected["pixel_auroc"], 1e-3)
    assert _close(written["aupro"], expected["aupro"], 1e-3)
    assert written["map_size"] == MAP_SIZE and written["model_id"] == NEW_MODEL


def test_data_is_not_trivial(evaluated) -> None:
    """Guards the comparison above: metrics strictly between 0.5 and 1 would catch swapped labels or maps."""
    categories = evaluated[2]["categories"]
    for name in ("bottle", "widget"):
        assert 0.5 < categories[name]["pixel_auroc"] < 1.0
        assert 0.0 < categories[name]["aupro"] < 1.0
    assert math.isnan(categories["solo"]["image_auroc"]) and math.isnan(categories["solo"]["pixel_auroc"])


def test_rows_are_accounted_for(evaluated) -> None:
    categories = evaluated[2]["categories"]
    for name, good, defective in (("bottle", 6, 6), ("widget", 6, 6), ("solo", 4, 0)):
        entry = categories[name]
        counts = (entry["n_good"], entry["n_defective"], entry["n_unlabeled"], entry["n_errors"])
        assert counts == (good, defective, 2, 1)
        assert entry["n_images"] == good + defective + 3


def test_choices_are_reported(evaluated) -> None:
    notes = evaluated[2]["notes"]
    assert any("widget: 2 models" in note and NEW_MODEL in note and OLD_MODEL in note for note in notes)
    assert any("widget: 1 repeated rows" in note for note in notes)
    assert "solo: image_auroc, pixel_auroc, aupro, image_f1_max undefined" in " ".join(notes)


def test_mean_over_categories(evaluated) -> None:
    written = json.loads((evaluated[1] / "metrics.json").read_text())
    categories, mean = written["categories"], written["mean"]
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
        defined = [entry[key] for entry in categories.values() if entry[key] is not None]
        assert len(defined) == 2 and mean[key] == pytest.approx(np.mean(defined), abs=1e-12)
    assert mean["n_images"] == sum(entry["n_images"] for entry in categories.values()) == 15 + 15 + 7
    for key in ("false_alarm_rate", "recall"):
        defined = [entry[key] for entry in categories.values() if entry[key] is not None]
        assert mean[key] == pytest.approx(np.mean(defined), abs=1e-12)
    assert mean["fp"] == sum(entry["fp"] for entry in categories.values()) and mean["threshold"] is None
    assert mean["image_f1_threshold"] is None and mean["map_size"] == MAP_SIZE and mean["n_categories"] == 3


def test_csv_has_one_row_per_category_and_mean(evaluated) -> None:
    with open(evaluated[1] / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["category"] for row in rows] == ["bottle", "solo", "widget", "mean"]
    assert float(rows[0]["pixel_auroc"]) == pytest.approx(evaluated[2]["categories"]["bottle"]["pixel_auroc"])
    assert rows[1]["image_auroc"] == ""  # undefined: empty cell, not "nan"
    assert float(rows[0]["threshold"]) == THRESHOLD and rows[0]["threshold_source"] == "checkpoint"
    assert "recall_per_defect" not in rows[0] and "top_flagged" not in rows[0]  # nested: metrics.json only


def test_report_is_self_contained_with_paper_numbers(evaluated) -> None:
    page = (evaluated[1] / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"]?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page and "<link" not in page
    for name in ("bottle", "widget", "solo"):
        assert f"id='cat-{name}'" in page
    image, pixel = PAPER_STFPM["bottle"]
    bottle_row = re.search(r"<tr><td><a href='#cat-bottle'>bottle</a></td>.*?</tr>", page).group(0)
    assert f"<td class='paper'>{image:.3f}</td>" in bottle_row and f"<td class='paper'>{pixel:.3f}</td>" in bottle_row
    widget_row = re.search(r"<tr><td><a href='#cat-widget'>widget</a></td>.*?</tr>", page).group(0)
    assert widget_row.count("<td class='paper'>–</td>") == 2
    # 1 overview + 3 category figures + 3 examples per side (solo: good only) + 1 flagged unlabelled image each.
    assert page.count("src='data:image/png;base64,") == 1 + 3 + 7 + 7 + 4
    assert page.count("image unreadable, map only") == 3  # bottle's and widget's first defective, solo's flagged


def test_table_printed(evaluated) -> None:
    table = next(message for message in evaluated[3] if message.startswith("category"))
    assert [line.split()[0] for line in table.splitlines()[2:6]] == ["bottle", "solo", "widget", "mean"]
    assert "32x32" in table.splitlines()[-1]


def test_model_id_picks_an_older_model(evaluated, tmp_path) -> None:
    scores = evaluated[0]
    result = evaluate_scores(scores, tmp_path, model_id=OLD_MODEL, progress=None)
    assert list(result["categories"]) == ["widget"]
    entry, expected = result["categories"]["widget"], reference(scores, "widget", OLD_MODEL)
    assert entry["model_id"] == OLD_MODEL and entry["n_errors"] == 0 and entry["n_unlabeled"] == 0
    assert entry["image_auroc"] == pytest.approx(expected["image_auroc"], abs=1e-9)
    assert entry["pixel_auroc"] == pytest.approx(expected["pixel_auroc"], abs=1e-3)
    assert any("bottle: none of the requested model ids" in note for note in result["notes"])


def test_unknown_model_id_is_a_clear_error(evaluated, tmp_path) -> None:
    with pytest.raises(ValueError, match=f"model id.*deadbeef.*not in the scores; ids there: .*{NEW_MODEL}"):
        evaluate_scores(evaluated[0], tmp_path, model_id="deadbeef", progress=None)


def test_missing_and_empty_scores_folders(tmp_path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_scores(tmp_path / "nope", tmp_path / "out", progress=None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not a scores table"):
        evaluate_scores(empty, tmp_path / "out", progress=None)
    table = ScoresTable(str(empty))
    table.commit([], [], {"run_id": "r0"}, overwrite=False)
    with pytest.raises(ValueError, match="holds no data files"):
        evaluate_scores(empty, tmp_path / "out", progress=None)
    pq.write_table(SCHEMA.empty_table(), empty / "r1-00000.parquet")
    table.commit(
        [
            DataFile(
                "r1-00000.parquet", (empty / "r1-00000.parquet").stat().st_size, 0, file_stats(SCHEMA.empty_table())
            )
        ],
        [],
        {"run_id": "r1"},
        overwrite=False,
    )
    with pytest.raises(ValueError, match="no rows"):
        evaluate_scores(empty, tmp_path / "out", progress=None)
    assert cli.main(["evaluate", "--scores", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().startswith("stfpm-ray evaluate: error: scores table")
    assert not (tmp_path / "out").exists()


def test_job_entry_point(tmp_path) -> None:
    job = Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py"
    command = [sys.executable, str(job), "--scores", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "scores table" in done.stderr and "Traceback" not in done.stderr


def test_deployed_threshold_from_the_checkpoint_else_from_the_rows(evaluated) -> None:
    categories = evaluated[2]["categories"]
    bottle, widget = categories["bottle"], categories["widget"]
    assert bottle["threshold"] == THRESHOLD and bottle["threshold_source"] == "checkpoint"
    assert bottle["calibration"] == CALIBRATION
    # widget's checkpoint folder does not exist: score / score_norm gives the threshold back (float32 rows)
    assert widget["threshold"] == pytest.approx(THRESHOLD, rel=1e-6)
    assert widget["threshold_source"] == "score / score_norm"
    assert widget["calibration"] is None


@pytest.mark.parametrize("category", ["bottle", "widget", "solo"])
def test_operating_point_is_what_is_anomalous_decided(evaluated, category: str) -> None:
    written = json.loads((evaluated[1] / "metrics.json").read_text())["categories"][category]
    expected = reference(evaluated[0], category, NEW_MODEL)
    counts = ("tp", "fp", "tn", "fn")
    assert {key: written[key] for key in counts} == {key: expected[key] for key in counts}
    assert _close(written["false_alarm_rate"], expected["fp"] / max(expected["fp"] + expected["tn"], 1), 1e-12)
    defective = expected["labels"] == 1
    for defect in ("crack", "scratch"):
        chosen = defective & (expected["defects"] == defect)
        if chosen.any():
            cell = written["recall_per_defect"][defect]
            assert (cell["n"], cell["detected"]) == (int(chosen.sum()), int((expected["flagged"] & chosen).sum()))
    assert written["n_unlabeled_flagged"] == 1  # one of the two unlabelled rows lies above the threshold
    assert written["n_flagged"] == expected["tp"] + expected["fp"] + 1


def test_operating_point_is_not_trivial(evaluated) -> None:
    """Guards the comparison above: both kinds of error happen at the deployed threshold."""
    categories = evaluated[2]["categories"]
    assert sum(categories[name]["fp"] for name in ("bottle", "widget", "solo")) > 0
    assert sum(categories[name]["fn"] for name in ("bottle", "widget")) > 0
    assert sum(categories[name]["tp"] for name in ("bottle", "widget")) > 0


def test_operating_point_counts_by_defect() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1, -1])
    flagged = np.array([True, False, False, True, False, True, True, True])
    defects = np.array(["good", "good", "good", "crack", "crack", "hole", None, None], dtype=object)
    point = operating_point(labels, flagged, defects)
    assert (point["tp"], point["fp"], point["tn"], point["fn"]) == (3, 1, 2, 1)
    assert point["false_alarm_rate"] == pytest.approx(1 / 3) and point["recall"] == pytest.approx(3 / 4)
    assert point["recall_per_defect"] == {
        "crack": {"n": 2, "detected": 1, "recall": 0.5},
        "hole": {"n": 1, "detected": 1, "recall": 1.0},
        "unknown": {"n": 1, "detected": 1, "recall": 1.0},
    }
    assert math.isnan(operating_point(labels[3:], flagged[3:], defects[3:])["false_alarm_rate"])


def test_report_shows_the_operating_point_and_run_metadata(evaluated) -> None:
    scores, report_dir, result, messages = evaluated
    page = (report_dir / "report.html").read_text()
    settings = result["settings"]
    assert settings["table_version"] == 1 and settings["inputs"] == [str(scores.parent / "data")]
    assert settings["checkpoints"] == [str(scores.parent / "ckpt")] and settings["model_ids"]["bottle"] == NEW_MODEL
    assert "table version 1" in page and str(scores.parent / "data") in page
    assert "F1-max (oracle)" in page and any("threshold chosen on the test labels" in line for line in messages)
    bottle = page.split("id='cat-bottle'", 1)[1].split("<section", 1)[0]
    assert f"Deployed threshold {THRESHOLD:.4f}" in bottle and "lognormal-t fit to 8 held-out good images" in bottle
    assert "implied by the rows (score / score_norm)" in page.split("id='cat-widget'", 1)[1]
    table = re.search(r"<table id='defect-recall'>.*?</table>", page, re.S).group(0)
    assert "<th>crack</th><th>scratch</th>" in table and ">solo<" not in table  # solo has no defective images
    entry = result["categories"]["bottle"]["recall_per_defect"]["crack"]
    assert f"<td>{entry['recall']:.3f} ({entry['detected']}/{entry['n']})</td>" in table


def _unlabelled_rows(root: Path, n: int, rng: np.random.Generator) -> list[dict]:
    """A nightly archive: no labels, no masks; every third image above the threshold, one file gone."""
    rows = []
    for i in range(n):
        image = root / "archive" / f"{i:03d}.png"
        if i != 0:
            _image(image, rng)
        score = THRESHOLD * (2.0 - i / n if i % 3 == 0 else 0.2 + 0.5 * i / n)
        rows.append(_row(image, "archive", None, None, _map(rng, None, 0.0), score, NEW_MODEL, T0))
    return rows


def test_unlabelled_table_reports_flagged_images(tmp_path) -> None:
    rows = _unlabelled_rows(tmp_path, 30, np.random.default_rng(3))
    manifest = {
        "run_id": "night-1",
        "checkpoints": str(tmp_path / "gone"),
        "inputs": [str(tmp_path / "archive")],
        "model_ids": {"archive": NEW_MODEL},
    }
    scores = commit_rows(tmp_path / "scores", [(rows, manifest)])
    assert cli.main(["evaluate", "--scores", str(scores), "--out", str(tmp_path / "report")]) == 0
    entry = json.loads((tmp_path / "report" / "metrics.json").read_text())["categories"]["archive"]
    flagged = sorted((row for row in rows if row["is_anomalous"]), key=lambda row: -row["score"])
    assert entry["n_flagged"] == entry["n_unlabeled_flagged"] == len(flagged) == 10
    assert entry["flag_rate"] == pytest.approx(10 / 30) and entry["n_unlabeled"] == 30
    assert [item["path"] for item in entry["top_flagged"]] == [row["path"] for row in flagged[:N_FLAGGED]]
    assert entry["top_flagged"][0]["score_norm"] == pytest.approx(2.0, rel=1e-6)
    assert entry["threshold"] == pytest.approx(THRESHOLD, rel=1e-6) and entry["image_auroc"] is None
    assert entry["score_norm_quantiles"]["max"] == pytest.approx(2.0, rel=1e-6)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "ROC of all categories" not in page
    assert "Flagged unlabelled images, highest score first" in page and "10 of 30 unlabelled" in page
    # one histogram, then the flagged images: the first (highest, its file gone) as the map alone
    assert page.count("src='data:image/png;base64,") == 1 + N_FLAGGED
    assert page.count("image unreadable, map only") == 1 and "no labelled rows (an unlabelled archive)" in page


def test_rows_are_decided_again_by_the_operating_point_in_force_without_rescoring(tmp_path) -> None:
    """A calibrate after the rows were scored: evaluate decides them against the new point, says which point
    decided and how many rows it decides differently, and keeps the history; the rows themselves are unchanged."""
    rows = _unlabelled_rows(tmp_path, 30, np.random.default_rng(3))
    checkpoints = tmp_path / "ckpt"
    write_checkpoint_meta(checkpoints / "archive", "archive", NEW_MODEL, THRESHOLD, CALIBRATION)
    manifest = {"run_id": "night-1", "checkpoints": str(checkpoints), "model_ids": {"archive": NEW_MODEL}}
    scores = commit_rows(tmp_path / "scores", [(rows, manifest)])
    before = evaluate_scores(scores, tmp_path / "before", progress=None)["categories"]["archive"]
    assert before["operating_point"]["id"] == "training" and before["n_flagged"] == 10
    assert before["n_decided_anew"] == 0 and len(before["operating_history"]) == 1

    meta = read_meta(checkpoints / "archive")
    record = {
        "id": "calibrate-1",
        "threshold": 1.5 * THRESHOLD,
        "target_far": 0.05,
        "method": "lognormal-t",
        "source": "10 good images under /day2",
        "created_at": "2026-12-07T00:00:00+00:00",
        "n_val": 10,
    }
    add_operating_point(checkpoints / "archive", meta, record)
    assert read_meta(checkpoints / "archive").model_id == NEW_MODEL  # the rows keep their model
    after = evaluate_scores(scores, tmp_path / "after", progress=None)["categories"]["archive"]
    expected = sum(float(np.float32(row["score"])) > 1.5 * THRESHOLD for row in rows)  # as stored: float32
    assert 0 < expected < 10 and after["n_flagged"] == expected and after["n_decided_anew"] == 10 - expected
    assert after["threshold"] == pytest.approx(1.5 * THRESHOLD) and after["operating_point"]["id"] == "calibrate-1"
    assert [point["id"] for point in after["operating_history"]] == ["training", "calibrate-1"]
    assert after["top_flagged"][0]["score_norm"] == pytest.approx(2.0 / 1.5, rel=1e-6)
    page = (tmp_path / "after" / "report.html").read_text()
    assert "Operating points of this checkpoint, the last in force" in page and "decided differently now" in page
    assert read_scores(scores).is_anomalous.sum() == 10  # nothing was rescored or rewritten
