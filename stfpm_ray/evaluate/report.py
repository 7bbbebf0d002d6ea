"""Writing evaluation results: metrics.json, metrics.csv, a self-contained report.html and a text table.

The HTML embeds every figure as a base64 PNG and uses no scripts, fonts or style sheets from elsewhere, so
it can be mailed, attached to a ticket or opened on an air-gapped machine. Figures use matplotlib's Agg
canvas directly (no pyplot state), so reports can be rendered from any thread or a headless job.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage

from stfpm_ray.data.images import ImageDecodeError, load_image
from stfpm_ray.evaluate.metrics import roc_curve_points
from stfpm_ray.progress import fixed_width_table
from stfpm_ray.store.fs import resolve, write_text_atomic

PAPER_SOURCE = (
    "Official STFPM on MVTec AD (Wang et al. 2021, 'Student-Teacher Feature Pyramid Matching for Anomaly "
    "Detection', arXiv 2103.04257): image AUROC of the released checkpoints, pixel AUROC of paper v2. "
    "Published 15-category means: image AUROC 0.955, pixel AUROC 0.970, PRO 0.928."
)
# category -> (image AUROC, pixel AUROC), from the source above.
PAPER_STFPM: dict[str, tuple[float, float]] = {
    "carpet": (0.964, 0.988),
    "grid": (0.982, 0.990),
    "leather": (0.951, 0.993),
    "tile": (0.982, 0.974),
    "wood": (0.996, 0.972),
    "bottle": (1.000, 0.988),
    "cable": (0.936, 0.955),
    "capsule": (0.893, 0.983),
    "hazelnut": (1.000, 0.985),
    "metal_nut": (0.983, 0.976),
    "pill": (0.951, 0.978),
    "screw": (0.895, 0.983),
    "toothbrush": (0.897, 0.989),
    "transistor": (0.939, 0.825),
    "zipper": (0.961, 0.985),
}
PIXEL_METRICS_NOTE = (
    "Pixel AUROC and AUPRO are streamed through fixed 65,536-bin histograms (stfpm_ray.evaluate.metrics.PixelMetrics: "
    "1.5 MiB per category whatever the number of images). They equal the exact metrics with scores inside "
    "one bin treated as tied; *_max_binning_error are guaranteed bounds on the difference (measured errors "
    "are far smaller, about 1e-6)."
)
F1_ORACLE_NOTE = (
    "F1-max is an oracle: its threshold is chosen on the same test labels it is scored against, so no deployment "
    "reaches it. The deployed threshold (behind is_anomalous) comes from held-out good training images only; "
    "false-alarm rate and recall are measured there."
)
# Inputs of the scoring runs listed in the report's header; metrics.json holds them all.
N_INPUTS_SHOWN = 10
COLORMAP = "jet"
OVERLAY_ALPHA = 0.5


@dataclass
class Example:
    """One image shown in the report with its decoded anomaly map (and mask, when it has one)."""

    path: str
    score: float
    label: int | None  # None: unlabelled, shown because it was flagged
    defect: str | None
    anomaly_map: np.ndarray
    mask: np.ndarray | None
    score_norm: float | None = None


@dataclass
class CategoryDetail:
    """What the figures of one category need beyond metrics.json: labelled scores and example maps."""

    name: str
    labels: np.ndarray
    scores: np.ndarray
    examples: list[Example]
    map_max: float  # top of the colour scale of this category's overlays
    unlabeled_scores: np.ndarray = field(default_factory=lambda: np.empty(0))
    # the good scores the operating point in force was set from (empty where the checkpoint is out of reach)
    reference_scores: np.ndarray = field(default_factory=lambda: np.empty(0))


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value: object, digits: int = 3) -> str:
    if _is_missing(value):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"
    return str(value)


def _json_safe(value: object) -> object:
    """NaN to None (JSON has no NaN) and numpy scalars to Python numbers, recursively."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if _is_missing(value) else value


def metrics_json(result: dict) -> str:
    """Strict JSON (no NaN tokens, which many JSON parsers reject): undefined metrics are null."""
    return json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n"


def metrics_csv(result: dict) -> str:
    """One row per category plus a ``mean`` row; undefined values are empty cells.

    Nested figures (calibration, recall per defect, flagged images) have no cell: metrics.json holds them.
    """
    first = next(iter(result["categories"].values()))
    columns = [key for key, value in first.items() if not isinstance(value, (dict, list))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["category", *columns], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    rows = [*result["categories"].items(), ("mean", result["mean"])]
    for name, entry in rows:
        cells = {key: "" if _is_missing(entry.get(key)) else entry[key] for key in columns}
        writer.writerow({"category": name, **cells})
    return buffer.getvalue()


def _paper_mean(names: Iterable[str]) -> tuple[float, float] | None:
    """Paper means over the same categories, or None when one of them has no published number."""
    values = [PAPER_STFPM.get(name) for name in names]
    if not values or any(value is None for value in values):
        return None
    return float(np.mean([v[0] for v in values])), float(np.mean([v[1] for v in values]))


def _table_rows(result: dict) -> list[tuple[str, dict, tuple[float, float] | None]]:
    categories = result["categories"]
    rows = [(name, entry, PAPER_STFPM.get(name)) for name, entry in categories.items()]
    rows.append(("mean", result["mean"], _paper_mean(categories)))
    return rows


def format_table(result: dict) -> str:
    """The per-category table as fixed-width text, for the terminal and job logs."""
    header = (
        "category",
        "img AUROC",
        "(paper)",
        "pix AUROC",
        "(paper)",
        "AUPRO",
        "F1 oracle",
        "threshold",
        "FAR",
        "recall",
        "flagged",
        "good",
        "defect",
        "unlab",
        "errors",
    )
    rows = []
    for name, entry, paper in _table_rows(result):
        paper_image, paper_pixel = paper if paper else (None, None)
        rows.append(
            (
                name,
                _fmt(entry["image_auroc"]),
                _fmt(paper_image),
                _fmt(entry["pixel_auroc"]),
                _fmt(paper_pixel),
                _fmt(entry["aupro"]),
                _fmt(entry["image_f1_max"]),
                _fmt(entry["threshold"], 4),
                _fmt(entry["false_alarm_rate"]),
                _fmt(entry["recall"]),
                entry["n_flagged"],
                entry["n_good"],
                entry["n_defective"],
                entry["n_unlabeled"],
                entry["n_errors"],
            )
        )
    table = fixed_width_table(header, rows, rule=True)
    return (
        f"{table}\nFAR (false alarms on good images), recall and flagged: at the checkpoint's operating point in "
        "force (the stored is_anomalous where the checkpoint is out of reach); F1 oracle: threshold chosen on the "
        "test labels\n"
        f"pixel metrics at the stored map resolution: {_resolution(result)}"
    )


def _resolution(result: dict) -> str:
    shapes = sorted({tuple(entry["map_shape"]) for entry in result["categories"].values() if entry.get("map_shape")})
    return ", ".join(f"{height}x{width}" for height, width in shapes) or "no maps"


# ----------------------------------------------------------------------------------------------------------
# Figures


def _png_data_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _roc_axes(axes: Axes, detail: CategoryDetail, label: str) -> bool:
    """Draw the image ROC of one category; False when it is undefined (one class only)."""
    fpr, tpr = roc_curve_points(detail.labels, detail.scores) if detail.labels.size else ((), ())
    if len(fpr):
        axes.plot(fpr, tpr, label=label, linewidth=1.5)
    return bool(len(fpr))


def _overview_figure(details: list[CategoryDetail], per_category: dict[str, dict]) -> str | None:
    """All categories' ROC curves; None when no category has both good and defective images to draw one."""
    figure = Figure(figsize=(7.5, 4.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    palette = "tab10" if len(details) <= 10 else "tab20"  # MVTec AD has 15 categories: keep colours distinct
    axes.set_prop_cycle(color=matplotlib.colormaps[palette].colors)
    drawn = [_roc_axes(axes, d, f"{d.name} ({_fmt(per_category[d.name]['image_auroc'])})") for d in details]
    if not any(drawn):
        return None
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
    axes.set_title("Image ROC per category (AUROC)")
    axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    return _figure_data_uri(figure)


def _histogram_axes(axes: Axes, detail: CategoryDetail, entry: dict) -> None:
    """Scores of good, defective and unlabelled images with the deployed threshold, the line that decides
    ``is_anomalous``, and the F1-max threshold for comparison."""
    every = np.concatenate([detail.scores, detail.unlabeled_scores, detail.reference_scores])
    if every.size:
        edges = np.histogram_bin_edges(every, bins=min(40, max(5, every.size // 3)))
        for chosen, name, color in (
            (detail.scores[detail.labels == 0], "good", "tab:green"),
            (detail.scores[detail.labels == 1], "defective", "tab:red"),
            (detail.unlabeled_scores, "unlabelled", "tab:blue"),
        ):
            if chosen.size:
                axes.hist(chosen, bins=edges, alpha=0.55, color=color, label=f"{name} ({chosen.size})")
        if detail.reference_scores.size:  # what the threshold was set from: a drift shows as a gap to these
            axes.hist(
                detail.reference_scores,
                bins=edges,
                histtype="step",
                color="black",
                linewidth=1.2,
                label=f"calibration's good images ({detail.reference_scores.size})",
            )
    else:
        axes.text(0.5, 0.5, "no scored images", ha="center", va="center")
    lines = [
        (value, label, style)
        for value, label, style in (
            (entry["threshold"], "deployed threshold", "-"),
            (entry["image_f1_threshold"], "F1-max threshold (oracle)", ":"),
        )
        if not _is_missing(value)
    ]
    for value, label, style in lines:
        axes.axvline(value, color="black", linestyle=style, linewidth=1.3, label=f"{label} {_fmt(value, 4)}")
    if lines:  # a threshold far above every score (a strict calibration) must still be in view
        low, high = axes.get_xlim()
        low, high = min(low, *(v for v, _, _ in lines)), max(high, *(v for v, _, _ in lines))
        axes.set_xlim(low - 0.03 * (high - low), high + 0.03 * (high - low))
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    axes.set(xlabel="image score (max of anomaly map)", ylabel="images", title="Image scores")


def _category_figure(detail: CategoryDetail, entry: dict) -> str:
    """Image ROC (where good and defective images exist) beside the score histogram."""
    has_roc = 0 < int(detail.labels.sum()) < detail.labels.size
    figure = Figure(figsize=(10.0 if has_roc else 5.6, 3.4), dpi=100, layout="constrained")
    if has_roc:
        roc, hist = figure.subplots(1, 2)
        _roc_axes(roc, detail, f"AUROC {_fmt(entry['image_auroc'])}")
        roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        roc.set(
            xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02), title="Image ROC"
        )
        roc.legend(loc="lower right")
    else:
        hist = figure.subplots()
    _histogram_axes(hist, detail, entry)
    return _figure_data_uri(figure)


def threshold_origin(entry: dict) -> str:
    """Where the deployed threshold came from and how it was set, in words, for the report."""
    record, source, point = entry.get("calibration"), entry.get("threshold_source"), entry.get("operating_point")
    if source is None:
        return "unknown: no checkpoint reachable and no score_norm in the rows"
    if source != "checkpoint":
        return f"implied by the rows ({source}): the model's checkpoint was not reachable, its stored decisions stand"
    images = "held-out good images" if point.get("id") == "training" else f"good images ({point.get('source')})"
    where = f"the checkpoint's operating point '{point.get('id')}'"
    if not record:
        return f"{where}: the maximum of the validation scores (written before calibration was recorded)"
    if record.get("method") == "max":
        return f"{where}: the maximum of {record.get('n_val')} {images}"
    bound = {
        "val_max": "the largest good score, above the fit",
        "order statistic": f"the {record.get('floor_rank')}th largest good score, above the fit",
    }.get(record.get("bound"), "the fit")
    return (
        f"{where}: {record.get('method')} fit to {record.get('n_val')} {images}, target false-alarm rate "
        f"{_fmt(record.get('target_far'), 4)} (binding: {bound})"
    )


def _defect_table(per_category: dict[str, dict]) -> tuple[list[str], list[dict]]:
    """Recall at the deployed threshold per category (rows) and defect type (columns); None where a category
    has no images of that defect."""
    defects = sorted({name for entry in per_category.values() for name in entry["recall_per_defect"]})
    rows = [
        {"name": name, "cells": [entry["recall_per_defect"].get(defect) for defect in defects]}
        for name, entry in per_category.items()
        if entry["recall_per_defect"]
    ]
    return defects, rows


def _example_tile(example: Example, map_max: float) -> tuple[str, str | None]:
    """PNG of [image | image with map overlay], or the map alone when the image cannot be read.

    Returns (data URI, reason the image is missing or None). The ground-truth outline is drawn in white.
    """
    height, width = example.anomaly_map.shape
    colours = matplotlib.colormaps[COLORMAP](np.clip(example.anomaly_map / map_max, 0.0, 1.0))[..., :3] * 255.0
    try:
        image = load_image(example.path, (height, width)).astype(np.float64)
        missing = None
    except ImageDecodeError as exc:
        image, missing = None, str(exc)
    overlay = colours if image is None else (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colours
    if example.mask is not None and example.mask.any():
        overlay[example.mask & ~ndimage.binary_erosion(example.mask)] = 255.0
    panels = (
        [overlay] if image is None else [image, np.full((height, max(2, min(height, width) // 32), 3), 255.0), overlay]
    )
    return _png_data_uri(np.hstack(panels).round().astype(np.uint8)), missing


# ----------------------------------------------------------------------------------------------------------
# HTML: templates/report.html.j2, autoescaped

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("stfpm_ray.evaluate", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def _kind(example: Example) -> str:
    if example.label is None:
        return f"unlabelled, {_fmt(example.score_norm)} x threshold"
    return "good" if example.label == 0 else f"defective ({example.defect or 'unknown defect'})"


def _example_sets(detail: CategoryDetail) -> list[tuple[str, list[dict]]]:
    good = sorted((e for e in detail.examples if e.label == 0), key=lambda e: -e.score)
    defective = sorted((e for e in detail.examples if e.label == 1), key=lambda e: e.score)
    flagged = sorted((e for e in detail.examples if e.label is None), key=lambda e: -e.score)
    chosen = (
        [
            ("Highest-scored good images (likely false positives)", good),
            ("Lowest-scored defective images (likely misses)", defective),
        ]
        if detail.labels.size
        else []
    )
    if detail.unlabeled_scores.size:
        chosen.append(("Flagged unlabelled images, highest score first", flagged))
    sets = []
    for title, examples in chosen:
        tiles = []
        for example in examples:
            uri, missing = _example_tile(example, detail.map_max)
            tiles.append(
                {
                    "uri": uri,
                    "missing": missing,
                    "kind": _kind(example),
                    "score": example.score,
                    "path": example.path,
                    "file": Path(example.path).name,
                }
            )
        sets.append((title, tiles))
    return sets


def render_html(result: dict, details: list[CategoryDetail]) -> str:
    """The whole report as one self-contained HTML document."""
    table = [
        {
            "name": name,
            "entry": entry,
            "is_mean": index == len(result["categories"]),
            "paper_image": paper[0] if paper else None,
            "paper_pixel": paper[1] if paper else None,
        }
        for index, (name, entry, paper) in enumerate(_table_rows(result))
    ]
    sections = [
        {
            "name": detail.name,
            "entry": result["categories"][detail.name],
            "map_max": detail.map_max,
            "figure": _category_figure(detail, result["categories"][detail.name]),
            "origin": threshold_origin(result["categories"][detail.name]),
            "example_sets": _example_sets(detail),
        }
        for detail in details
    ]
    defects, defect_rows = _defect_table(result["categories"])
    return _TEMPLATES.get_template("report.html.j2").render(
        settings=result["settings"],
        n_categories=len(result["categories"]),
        resolution=_resolution(result),
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        table=table,
        fmt=_fmt,
        paper_source=PAPER_SOURCE,
        notes=result["notes"],
        overview=_overview_figure(details, result["categories"]),
        sections=sections,
        colormap=COLORMAP,
        defects=defects,
        defect_rows=defect_rows,
        n_inputs_shown=N_INPUTS_SHOWN,
        drifted=[(name, entry["drift"]) for name, entry in result["categories"].items() if entry["drift"]["detected"]],
    )


def write_report(report_dir: str | Path, result: dict, details: list[CategoryDetail]) -> list[Path]:
    """Write metrics.json, metrics.csv and report.html into ``report_dir`` (a folder or URI)."""
    outputs = {
        "metrics.json": metrics_json(result),
        "metrics.csv": metrics_csv(result),
        "report.html": render_html(result, details),
    }
    for name, text in outputs.items():
        write_text_atomic(resolve(report_dir).join(name), text)
    return [Path(report_dir) / name for name in outputs]
