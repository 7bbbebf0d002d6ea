"""Evaluation of scoring Parquet: metrics against direct computations, row accounting, report outputs."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from stfpm_ray import cli
from stfpm_ray.evaluate.evaluation import evaluate_scores
from stfpm_ray.data.images import load_mask
from stfpm_ray.store.scores import SCHEMA
from stfpm_ray.store.mapcodec import decode_map, encode_map
from stfpm_ray.evaluate.metrics import aupro_exact, f1_max
from stfpm_ray.evaluate.report import PAPER_STFPM

MAP_SIZE = 32
IMAGE_SIZE = 64
NEW_MODEL, OLD_MODEL = "a1b2c3d4e5f60718", "0f0f0f0f0f0f0f0f"
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _row(path, category, label, mask_path, anomaly_map, score, model, when, defect=None) -> dict:
    png, scale = encode_map(anomaly_map)
    return dict(
        path=str(path), category=category, score=score, score_norm=score / 2, is_anomalous=score > 2, label=label,
        defect=defect, mask_path=mask_path and str(mask_path), anomaly_map=png, map_scale=scale, model_id=model,
        scored_at=when, status="ok", error=None,
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


def build_scores(root: Path) -> Path:
    """Scores of three categories in two Parquet files, with image and mask files on disk.

    bottle (paper numbers exist) and widget: 6 good, 6 defective, 2 unlabeled, 1 error each; widget also
    holds an older model's rows and an older repeat of one image. solo: good images only.
    """
    rng = np.random.default_rng(7)
    rows = []
    for category, n_good, n_defective in (("bottle", 6, 6), ("widget", 6, 6), ("solo", 4, 0)):
        for i in range(n_good + n_defective + 2):
            label = 0 if i < n_good else 1 if i < n_good + n_defective else None
            image = root / "data" / category / f"{i:03d}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            if i != n_good:  # the first defective image stays unreadable: its overlay shows the map alone
                Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(image)
            mask_path = None
            if label == 1:
                mask_path = root / "data" / category / "ground_truth" / f"{i:03d}_mask.png"
                _write_mask(mask_path, rng)
            mask = load_mask(mask_path, MAP_SIZE) if mask_path else None
            anomaly_map = _map(rng, mask, strength=0.0 if i == n_good else rng.uniform(0.05, 0.3))
            score = float(anomaly_map.max() * rng.uniform(1.0, 1.3))
            defect = "crack" if label == 1 else "good" if label == 0 else None
            rows.append(_row(image, category, label, mask_path, anomaly_map, score, NEW_MODEL, T0, defect))
            if category == "widget" and label is not None:
                older = _map(rng, None, 0.0)  # another model's row of the same image: must not count
                old_score, before = float(older.max()), T0 - timedelta(days=3)
                rows.append(_row(image, category, label, mask_path, older, old_score, OLD_MODEL, before, defect))
        rows.append(_error_row(root / "data" / category / "broken.png", category, NEW_MODEL))
    repeat = dict(rows[-20])  # an older repeat of a widget image by the same model: the newest row counts
    assert repeat["category"] == "widget" and repeat["model_id"] == NEW_MODEL
    rows.append(repeat | {"score": 1e3, "scored_at": T0 - timedelta(hours=1)})
    out = root / "scores"
    out.mkdir()
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half], schema=SCHEMA), out / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:], schema=SCHEMA), out / "part-1.parquet")
    (out / "_manifest.json").write_text("{}")  # readers skip names starting with "_"
    return out


def reference(scores_dir: Path, category: str, model: str) -> dict:
    """Direct computation on the decoded maps and masks of a category's newest rows of ``model``."""
    table = pq.read_table(scores_dir, filters=[("category", "=", category), ("model_id", "=", model)]).to_pandas()
    table = table.sort_values("scored_at").drop_duplicates("path", keep="last")
    labelled = table[(table["status"] == "ok") & table["label"].notna()]
    labels = labelled["label"].to_numpy(dtype=int)
    scores = labelled["score"].to_numpy(dtype=float)
    maps = np.stack([decode_map(png, scale) for png, scale in zip(labelled["anomaly_map"], labelled["map_scale"])])
    masks = np.stack([load_mask(path if isinstance(path, str) else None, MAP_SIZE) for path in labelled["mask_path"]])
    f1, threshold = f1_max(labels, scores) if labels.any() else (math.nan, math.nan)
    both = labels.any() and not labels.all()
    return {
        "image_auroc": roc_auc_score(labels, scores) if both else math.nan,
        "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()) if masks.any() else math.nan,
        "aupro": aupro_exact(maps, masks, 0.3),
        "image_f1_max": f1,
        "image_f1_threshold": threshold,
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
    assert mean["image_f1_threshold"] is None and mean["map_size"] == MAP_SIZE and mean["n_categories"] == 3


def test_csv_has_one_row_per_category_and_mean(evaluated) -> None:
    with open(evaluated[1] / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["category"] for row in rows] == ["bottle", "solo", "widget", "mean"]
    assert float(rows[0]["pixel_auroc"]) == pytest.approx(evaluated[2]["categories"]["bottle"]["pixel_auroc"])
    assert rows[1]["image_auroc"] == ""  # undefined: empty cell, not "nan"


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
    # 1 overview + 3 category figures + 3 examples per side (solo: good only).
    assert page.count("src='data:image/png;base64,") == 1 + 3 + 6 + 6 + 3
    assert "image unreadable, map only" in page  # the missing image file of each defective example set


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
    with pytest.raises(ValueError, match="no Parquet files"):
        evaluate_scores(empty, tmp_path / "out", progress=None)
    pq.write_table(SCHEMA.empty_table(), empty / "part-0.parquet")
    with pytest.raises(ValueError, match="no rows"):
        evaluate_scores(empty, tmp_path / "out", progress=None)
    assert cli.main(["evaluate", "--scores", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().startswith("stfpm-ray evaluate: error: scores folder")
    assert not (tmp_path / "out").exists()


def test_job_entry_point(tmp_path) -> None:
    job = Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py"
    command = [sys.executable, str(job), "--scores", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "scores folder" in done.stderr and "Traceback" not in done.stderr
