"""Writing evaluation results: metrics.json, metrics.csv, a self-contained report.html and a text table.

The HTML embeds every figure as a base64 PNG and uses no scripts, fonts or style sheets from elsewhere, so
it can be mailed, attached to a ticket or opened on an air-gapped machine. Figures use matplotlib's Agg
canvas directly (no pyplot state), so reports can be rendered from any thread or a headless job.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage

from stfpm_ray.data.images import ImageDecodeError, load_image
from stfpm_ray.evaluate.metrics import roc_curve_points

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
COLORMAP = "jet"
OVERLAY_ALPHA = 0.5


@dataclass
class Example:
    """One image shown in the report with its decoded anomaly map (and mask, when it has one)."""

    path: str
    score: float
    label: int
    defect: str | None
    anomaly_map: np.ndarray
    mask: np.ndarray | None


@dataclass
class CategoryDetail:
    """What the figures of one category need beyond metrics.json: labelled scores and example maps."""

    name: str
    labels: np.ndarray
    scores: np.ndarray
    examples: list[Example]
    map_max: float  # top of the colour scale of this category's overlays


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value: object, digits: int = 3) -> str:
    if _is_missing(value):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
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
    """One row per category plus a ``mean`` row; undefined values are empty cells."""
    columns = list(next(iter(result["categories"].values())))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["category", *columns], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    rows = [*result["categories"].items(), ("mean", result["mean"])]
    for name, entry in rows:
        writer.writerow({"category": name, **{key: "" if _is_missing(entry[key]) else entry[key] for key in columns}})
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
        f"{'category':<16}{'img AUROC':>10}{'(paper)':>9}{'pix AUROC':>11}{'(paper)':>9}{'AUPRO':>8}"
        f"{'F1-max':>8}{'good':>7}{'defect':>8}{'unlab':>7}{'errors':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, entry, paper in _table_rows(result):
        paper_image, paper_pixel = paper if paper else (None, None)
        lines.append(
            f"{name:<16}{_fmt(entry['image_auroc']):>10}{_fmt(paper_image):>9}{_fmt(entry['pixel_auroc']):>11}"
            f"{_fmt(paper_pixel):>9}{_fmt(entry['aupro']):>8}{_fmt(entry['image_f1_max']):>8}"
            f"{entry['n_good']:>7}{entry['n_defective']:>8}{entry['n_unlabeled']:>7}{entry['n_errors']:>8}"
        )
    lines.append(f"pixel metrics at the stored map resolution: {_resolution(result)}")
    return "\n".join(lines)


def _resolution(result: dict) -> str:
    sizes = sorted({entry["map_size"] for entry in result["categories"].values() if entry["map_size"]})
    return ", ".join(f"{size}x{size}" for size in sizes) or "no maps"


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


def _overview_figure(details: list[CategoryDetail], per_category: dict[str, dict]) -> str:
    figure = Figure(figsize=(7.5, 4.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    palette = "tab10" if len(details) <= 10 else "tab20"  # MVTec AD has 15 categories: keep colours distinct
    axes.set_prop_cycle(color=matplotlib.colormaps[palette].colors)
    for detail in details:
        _roc_axes(axes, detail, f"{detail.name} ({_fmt(per_category[detail.name]['image_auroc'])})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
    axes.set_title("Image ROC per category (AUROC)")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    return _figure_data_uri(figure)


def _category_figure(detail: CategoryDetail, entry: dict) -> str:
    """Image ROC and score histograms of good vs defective images, side by side."""
    figure = Figure(figsize=(10.0, 3.4), dpi=100, layout="constrained")
    roc, hist = figure.subplots(1, 2)
    if not _roc_axes(roc, detail, f"AUROC {_fmt(entry['image_auroc'])}"):
        roc.text(0.5, 0.5, "undefined: needs good and defective images", ha="center", va="center")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02), title="Image ROC")
    if roc.get_legend_handles_labels()[0]:
        roc.legend(loc="lower right")
    if detail.scores.size:
        edges = np.histogram_bin_edges(detail.scores, bins=min(30, max(5, detail.scores.size // 3)))
        for label, name, color in ((0, "good", "tab:green"), (1, "defective", "tab:red")):
            chosen = detail.scores[detail.labels == label]
            if chosen.size:
                hist.hist(chosen, bins=edges, alpha=0.55, color=color, label=f"{name} ({chosen.size})")
        threshold = entry["image_f1_threshold"]
        if not _is_missing(threshold):
            hist.axvline(threshold, color="black", linestyle="--", linewidth=1, label="F1-max threshold")
        hist.legend(fontsize="small")
    else:
        hist.text(0.5, 0.5, "no labelled images", ha="center", va="center")
    hist.set(xlabel="image score (max of anomaly map)", ylabel="images", title="Image scores")
    return _figure_data_uri(figure)


def _example_tile(example: Example, map_max: float) -> tuple[str, str | None]:
    """PNG of [image | image with map overlay], or the map alone when the image cannot be read.

    Returns (data URI, reason the image is missing or None). The ground-truth outline is drawn in white.
    """
    size = example.anomaly_map.shape[0]
    colours = matplotlib.colormaps[COLORMAP](np.clip(example.anomaly_map / map_max, 0.0, 1.0))[..., :3] * 255.0
    try:
        image = load_image(example.path, size).astype(np.float64)
        missing = None
    except ImageDecodeError as exc:
        image, missing = None, str(exc)
    overlay = colours if image is None else (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colours
    if example.mask is not None and example.mask.any():
        overlay[example.mask & ~ndimage.binary_erosion(example.mask)] = 255.0
    panels = [overlay] if image is None else [image, np.full((size, max(2, size // 32), 3), 255.0), overlay]
    return _png_data_uri(np.hstack(panels).round().astype(np.uint8)), missing


# ----------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 24px auto;
       max-width: 1320px; padding: 0 16px; line-height: 1.45; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1rem; margin: 18px 0 6px; }
.meta, .source, .notes, figcaption, .muted { color: #555; font-size: 0.9rem; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 8px 0; }
th, td { padding: 5px 9px; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }
th { background: #f2f4f7; position: sticky; top: 0; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
tr.mean td { font-weight: 600; border-top: 2px solid #bbb; background: #fff; }
td.paper, th.paper { color: #777; }
code { font-size: 0.85em; }
img.figure { max-width: 100%; height: auto; }
.examples { display: flex; flex-wrap: wrap; gap: 14px; }
.examples figure { margin: 0; max-width: 330px; }
.examples img { height: 150px; image-rendering: auto; border: 1px solid #ccc; }
figcaption { word-break: break-all; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _summary_table(result: dict) -> str:
    head = (
        "<tr><th>category</th><th>image AUROC</th><th class='paper'>paper</th><th>pixel AUROC</th>"
        "<th class='paper'>paper</th><th>AUPRO</th><th>F1-max</th><th>F1 threshold</th><th>good</th>"
        "<th>defective</th><th>unlabeled</th><th>errors</th><th>model</th></tr>"
    )
    body = []
    rows = _table_rows(result)
    for index, (name, entry, paper) in enumerate(rows):
        paper_image, paper_pixel = paper if paper else (None, None)
        is_mean = index == len(rows) - 1
        label = _e(name) if is_mean else f"<a href='#cat-{_e(name)}'>{_e(name)}</a>"
        body.append(
            f"<tr{' class=mean' if is_mean else ''}><td>{label}</td><td>{_fmt(entry['image_auroc'])}</td>"
            f"<td class='paper'>{_fmt(paper_image)}</td><td>{_fmt(entry['pixel_auroc'])}</td>"
            f"<td class='paper'>{_fmt(paper_pixel)}</td><td>{_fmt(entry['aupro'])}</td>"
            f"<td>{_fmt(entry['image_f1_max'])}</td><td>{_fmt(entry['image_f1_threshold'], 4)}</td>"
            f"<td>{entry['n_good']}</td><td>{entry['n_defective']}</td><td>{entry['n_unlabeled']}</td>"
            f"<td>{entry['n_errors']}</td><td><code>{_e(entry['model_id'] or '')}</code></td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _examples_html(title: str, examples: list[Example], map_max: float) -> str:
    if not examples:
        return f"<h3>{_e(title)}</h3><p class='muted'>none</p>"
    figures = []
    for example in examples:
        uri, missing = _example_tile(example, map_max)
        kind = "good" if example.label == 0 else f"defective ({example.defect or 'unknown defect'})"
        note = f"<br>image unreadable, map only: {_e(missing)}" if missing else ""
        figures.append(
            f"<figure><img src='{uri}' alt='{_e(Path(example.path).name)}'>"
            f"<figcaption><b>{example.score:.4g}</b> · {_e(kind)}<br><span title='{_e(example.path)}'>"
            f"{_e(Path(example.path).name)}</span>{note}</figcaption></figure>"
        )
    return f"<h3>{_e(title)}</h3><div class='examples'>{''.join(figures)}</div>"


def _category_section(detail: CategoryDetail, entry: dict) -> str:
    good = sorted((e for e in detail.examples if e.label == 0), key=lambda e: -e.score)
    defective = sorted((e for e in detail.examples if e.label == 1), key=lambda e: e.score)
    size = entry["map_size"]
    summary = (
        f"image AUROC <b>{_fmt(entry['image_auroc'])}</b> · pixel AUROC <b>{_fmt(entry['pixel_auroc'])}</b> · "
        f"AUPRO <b>{_fmt(entry['aupro'])}</b> · F1-max {_fmt(entry['image_f1_max'])} at score "
        f"{_fmt(entry['image_f1_threshold'], 4)} · {entry['n_images']} rows ({entry['n_good']} good, "
        f"{entry['n_defective']} defective, {entry['n_unlabeled']} unlabeled, {entry['n_errors']} errors) · "
        f"model <code>{_e(entry['model_id'] or 'unknown')}</code> · maps {f'{size}x{size}' if size else 'none'}"
    )
    overlay_note = (
        f"Left: image at map size; right: anomaly map overlaid ({COLORMAP}, 0 to {detail.map_max:.4g} = the "
        "largest map value of the category), ground truth outlined in white."
    )
    return (
        f"<section id='cat-{_e(detail.name)}'><h2>{_e(detail.name)}</h2><p>{summary}</p>"
        f"<img class='figure' src='{_category_figure(detail, entry)}' alt='ROC and score histogram'>"
        f"<p class='muted'>{_e(overlay_note)}</p>"
        f"{_examples_html('Highest-scored good images (likely false positives)', good, detail.map_max)}"
        f"{_examples_html('Lowest-scored defective images (likely misses)', defective, detail.map_max)}</section>"
    )


def render_html(result: dict, details: list[CategoryDetail]) -> str:
    """The whole report as one self-contained HTML document."""
    settings = result["settings"]
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    notes = "".join(f"<li>{_e(note)}</li>" for note in result["notes"])
    meta = (
        f"Scores <code>{_e(settings['scores'])}</code> · {len(result['categories'])} categories · generated "
        f"{generated}. Pixel metrics at the stored anomaly-map resolution ({_resolution(result)}), masks reduced "
        f"to it; AUPRO integrated up to FPR {settings['aupro_fpr_limit']}. Mean: unweighted over categories "
        "where defined; counts are totals."
    )
    sections = "".join(_category_section(detail, result["categories"][detail.name]) for detail in details)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>STFPM evaluation</title>"
        f"<style>{_CSS}</style></head><body><h1>STFPM evaluation</h1><p class='meta'>{meta}</p>"
        f"<h2>Summary</h2>{_summary_table(result)}<p class='source'>Paper columns: {_e(PAPER_SOURCE)}</p>"
        f"{f'<ul class=notes>{notes}</ul>' if notes else ''}"
        f"<img class='figure' src='{_overview_figure(details, result['categories'])}' alt='ROC of all categories'>"
        f"{sections}<p class='muted'>{_e(settings['pixel_metrics'])}</p></body></html>\n"
    )


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file in place."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)  # temporary files are created private; reports are meant to be shared
    os.replace(handle.name, path)


def write_report(report_dir: str | Path, result: dict, details: list[CategoryDetail]) -> list[Path]:
    """Write metrics.json, metrics.csv and report.html into ``report_dir`` (created if needed)."""
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    outputs = {
        folder / "metrics.json": metrics_json(result),
        folder / "metrics.csv": metrics_csv(result),
        folder / "report.html": render_html(result, details),
    }
    for path, text in outputs.items():
        _write_atomic(path, text)
    return list(outputs)
