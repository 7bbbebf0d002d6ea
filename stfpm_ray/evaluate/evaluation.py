"""Per-category metrics from a scores table: ``stfpm-ray evaluate --scores OUT_DIR --out REPORT_DIR``.

Runs on the driver alone, without Ray: the work is reading the table's Parquet files sequentially, twice. Memory stays
bounded whatever the number of rows:

1. the small columns (path, category, score, label, ...) of every row are read at once (a few hundred
   bytes per row) and give the counts, the image metrics and the choice of model per category;
2. the anomaly maps are then streamed in record batches of a few dozen rows, filtered by category and
   label, and folded into one :class:`~stfpm_ray.evaluate.metrics.PixelMetrics` per category (three fixed-size
   histograms, 1.5 MiB). Up to ``CATEGORIES_PER_PASS`` categories share one pass, because a filter on
   ``category`` cannot skip row groups that mix categories, so a pass per category would read and
   decompress every map once per category.

Pixel metrics are computed at the stored map resolution (``map_shape``; short side 128 by default), with masks
reduced to it by :func:`stfpm_ray.data.images.load_mask`, not at the image resolution: the report says so.
The binning of ``PixelMetrics`` is not exact; its guaranteed error bounds are reported beside the values.

Row accounting per category: ``n_images = n_good + n_defective + n_unlabeled + n_errors`` over the rows of
the evaluated model. Unlabelled rows (label null) enter no detection metric; error rows enter nothing.

Besides the threshold-free metrics (AUROC, AUPRO, and F1-max, whose threshold is chosen on the test labels: an
oracle), every category is reported at its deployed threshold, the one behind ``is_anomalous``: read from
the model's checkpoint when the scoring run's checkpoint folder is still reachable, else implied by the rows
(``score / score_norm``). There the decisions of ``is_anomalous`` give confusion counts, the false-alarm rate
on good images and recall per defect type; for unlabelled rows (nightly archives) the flagged count and rate
and the highest-scored flagged images.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from stfpm_ray.core.calibration import OperatingPoint
from stfpm_ray.core.checkpoint import CheckpointMeta, read_meta
from stfpm_ray.data.images import load_mask
from stfpm_ray.errors import InputNotFoundError, StfpmError, UserError
from stfpm_ray.evaluate import drift, metrics, report
from stfpm_ray.progress import Progress, log_progress, quiet
from stfpm_ray.store.fs import is_dir, resolve
from stfpm_ray.store.mapcodec import decode_map
from stfpm_ray.store.scores import ScoresTable

AUPRO_FPR_LIMIT = 0.3
# Examples shown per category and side (highest-scored good, lowest-scored defective).
N_EXAMPLES = 3
# Flagged unlabelled images shown per category (the nightly case), highest score first.
N_FLAGGED = 8
# Rows per streamed record batch: ~64 small PNG maps, a few MB at most.
BATCH_ROWS = 64
# Categories sharing one streaming pass: 64 x 1.5 MiB of histograms.
CATEGORIES_PER_PASS = 64
# Keys of a category entry that are averaged over categories (metrics, their binning error bounds) or summed.
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
BOUND_KEYS = ("pixel_auroc_max_binning_error", "aupro_max_binning_error")
RATE_KEYS = ("false_alarm_rate", "recall", "flag_rate")
COUNT_KEYS = (
    "n_images",
    "n_good",
    "n_defective",
    "n_unlabeled",
    "n_errors",
    "n_flagged",
    "n_unlabeled_flagged",
    "tp",
    "fp",
    "tn",
    "fn",
)
SMALL_COLUMNS = (
    "path",
    "category",
    "score",
    "score_norm",
    "is_anomalous",
    "label",
    "defect",
    "mask_path",
    "map_scale",
    "model_id",
    "status",
    "run_id",
)
REQUIRED_COLUMNS = (*SMALL_COLUMNS, "anomaly_map", "scored_at")

RowKey = tuple[str, int]  # (path, scored_at in microseconds): identifies a row across the two reads


@dataclass(frozen=True)
class Deployed:
    """The threshold that decides a model's rows, where it was read, and how it was calibrated.

    With the checkpoint in reach, that is its operating point in force (``point``), and every row is decided
    again against it when read: a ``calibrate`` run since the rows were scored changes the decisions without
    rescoring. Without it, the rows' stored ``is_anomalous`` stands, and the threshold is implied by them.
    """

    threshold: float = math.nan
    source: str | None = None  # "checkpoint", "score / score_norm", or None when neither tells
    calibration: dict | None = None  # the point's record without its scores; {} for checkpoints older than it
    point: OperatingPoint | None = None
    history: tuple[dict, ...] = ()  # every operating point of the checkpoint, oldest first


@dataclass
class CategoryRows:
    """The rows of one category that are evaluated: one model, one row per path (the newest)."""

    name: str
    model_id: str | None
    rows: pd.DataFrame
    deployed: Deployed = field(default_factory=Deployed)

    @property
    def ok(self) -> pd.DataFrame:
        return self.rows[self.rows["status"] == "ok"]

    @property
    def labelled(self) -> pd.DataFrame:
        """Rows that enter the metrics: scored successfully and labelled good or defective."""
        ok = self.ok
        return ok[ok["label"].notna()]

    @property
    def stored(self) -> np.ndarray:
        """Every ok row's ``is_anomalous`` as its scoring run decided it (score > threshold where null)."""
        ok = self.ok
        stored = ok["is_anomalous"].to_numpy(dtype=object)
        fallback = ok["score"].to_numpy(dtype=np.float64) > self.deployed.threshold
        return np.where(pd.isna(stored), fallback, np.equal(stored, True).astype(bool))

    @property
    def thresholds(self) -> pd.Series:
        """The threshold that decides each ok row now: the point in force's, or for an adaptive point the one
        of the scoring run that wrote the row (from that run's rows of the category)."""
        ok, point = self.ok, self.deployed.point
        if point is None or not point.adaptive:
            return pd.Series(self.deployed.threshold, index=ok.index, dtype=np.float64)
        return ok.groupby("run_id", dropna=False)["score"].transform(point.threshold_for).astype(np.float64)

    @property
    def flagged(self) -> np.ndarray:
        """The deployed decision of every ok row: against the operating point in force where the checkpoint
        is in reach, else as stored."""
        if self.deployed.point is None:
            return self.stored
        return self.ok["score"].to_numpy(dtype=np.float64) > self.thresholds.to_numpy()

    @property
    def score_norm(self) -> np.ndarray:
        """Every ok row's score over the threshold that decides it now (as stored where that is unknown)."""
        if self.deployed.point is None:
            return self.ok["score_norm"].to_numpy(dtype=np.float64)
        return self.ok["score"].to_numpy(dtype=np.float64) / self.thresholds.to_numpy()

    @property
    def top_flagged(self) -> pd.DataFrame:
        """The highest-scored flagged unlabelled rows: what an operator looks at after a nightly run."""
        ok = self.ok
        chosen = ok[self.flagged & ok["label"].isna().to_numpy()]
        return chosen.nlargest(N_FLAGGED, "score")


@dataclass
class PixelPass:
    """What the map stream of one category produced."""

    pixel: metrics.PixelMetrics
    map_shapes: set[tuple[int, int]] = field(default_factory=set)
    examples: dict[RowKey, report.Example] = field(default_factory=dict)
    without_mask: int = 0


def open_scores(scores_dir: str | Path, version: int | None = None) -> tuple[ds.Dataset, dict]:
    """The scores table (its current version, or ``version``) as a pyarrow dataset, with what made that
    version (:func:`run_metadata`), or a clear error when the table is missing, empty or foreign."""
    location = str(scores_dir)
    if not is_dir(resolve(location)):
        raise InputNotFoundError(f"scores table {location} does not exist (write one with `stfpm-ray score`)")
    table = ScoresTable(location)
    delta = table.intact(version)
    dataset = delta.to_pyarrow_dataset()
    if not dataset.files:
        raise UserError(f"the scores table {location} holds no data files: expected the output of `stfpm-ray score`")
    missing = [name for name in REQUIRED_COLUMNS if name not in dataset.schema.names]
    if missing:
        raise UserError(f"{location} lacks column(s) {', '.join(missing)}: is it the output of `stfpm-ray score`?")
    return dataset, run_metadata(table.history(), delta.version())


def _timestamps_us(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """``scored_at`` as int64 microseconds, -1 where null: a hashable, exact key shared by both reads."""
    return column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).fill_null(-1).to_numpy()


def read_index(dataset: ds.Dataset) -> pd.DataFrame:
    """The small columns of every row, plus ``ts`` (scored_at in microseconds)."""
    table = dataset.to_table(columns=[*SMALL_COLUMNS, "scored_at"])
    if table.num_rows == 0:
        raise UserError("the scores table holds data files but no rows")
    frame = table.drop_columns(["scored_at"]).to_pandas()
    frame["ts"] = _timestamps_us(table.column("scored_at"))
    return frame


def _format_ts(ts: int) -> str:
    return "unknown time" if ts < 0 else pd.Timestamp(ts, unit="us", tz="UTC").isoformat(timespec="seconds")


def _choose_model(name: str, frame: pd.DataFrame, wanted: set[str] | None, notes: list[str]) -> str | None:
    """The model to evaluate for one category: the one asked for, else the most recently scored one."""
    newest = frame.dropna(subset=["model_id"]).groupby("model_id")["ts"].max().sort_values()
    if wanted is not None:
        chosen = [model for model in newest.index if model in wanted]
        if len(chosen) > 1:
            raise UserError(f"--model-id names {len(chosen)} models of category {name!r}: {', '.join(chosen)}")
        return chosen[0] if chosen else None
    if newest.empty:
        return None
    if len(newest) > 1:
        older = ", ".join(f"{model} ({_format_ts(ts)})" for model, ts in newest.iloc[:-1].items())
        notes.append(
            f"{name}: {len(newest)} models scored; evaluated the newest, {newest.index[-1]} "
            f"(scored {_format_ts(newest.iloc[-1])}), not {older}. Choose with --model-id."
        )
    return str(newest.index[-1])


def select_rows(index: pd.DataFrame, model_ids: Sequence[str] | None, notes: list[str]) -> list[CategoryRows]:
    """Split the index by category, keep one model per category and the newest row per image path.

    Error rows without a model id belong to every model of their category: they failed before a model
    was applied. A path scored several times by the same model (e.g. on two nights) counts once.
    """
    wanted = set(model_ids) if model_ids else None
    if wanted is not None:
        unknown = sorted(wanted - set(index["model_id"].dropna()))
        if unknown:
            known = index.dropna(subset=["model_id"]).groupby("model_id")["category"].first()
            listing = ", ".join(f"{model} ({category})" for model, category in known.items()) or "none"
            raise UserError(f"model id(s) {', '.join(unknown)} not in the scores; ids there: {listing}")
    uncategorised = int(index["category"].isna().sum())
    if uncategorised:
        notes.append(f"{uncategorised} rows without a category were left out.")
    selected = []
    for name, frame in index.dropna(subset=["category"]).groupby("category", sort=True):
        model = _choose_model(str(name), frame, wanted, notes)
        if wanted is not None and model is None:
            notes.append(f"{name}: none of the requested model ids; category left out.")
            continue
        rows = frame[frame["model_id"].isna() | (frame["model_id"] == model)] if model else frame
        unique = rows.sort_values("ts", kind="stable").drop_duplicates("path", keep="last")
        if len(unique) < len(rows):
            notes.append(f"{name}: {len(rows) - len(unique)} repeated rows of the same image; the newest counts.")
        selected.append(CategoryRows(str(name), model, unique.reset_index(drop=True)))
    if not selected:
        raise UserError("no category to evaluate in the scores")
    return selected


def run_metadata(history: list[dict], current: int) -> dict:
    """What made version ``current``: its number, the scoring runs' inputs, each model's checkpoint folder.

    Read from the manifests in the commit metadata (:meth:`ScoresTable.history`); commits after the evaluated
    version do not count, and a model's folder is taken from the newest run that scored with it.
    """
    inputs: set[str] = set()
    roots: dict[str, str] = {}
    for entry in history:  # newest first
        manifest = entry["manifest"]
        if manifest is None or entry["version"] > current:
            continue
        inputs.update(manifest.get("inputs") or [])
        for model in (manifest.get("model_ids") or {}).values():
            if manifest.get("checkpoints"):
                roots.setdefault(model, str(manifest["checkpoints"]))
    return {"table_version": current, "inputs": sorted(inputs), "checkpoint_roots": roots}


def _checkpoint_meta(category: str, model_id: str, root: str) -> CheckpointMeta | None:
    """The checkpoint that made ``model_id``, if it is still where its scoring run found it (a folder of
    categories or the one checkpoint itself); None when it moved, changed or cannot be read."""
    for folder in (posixpath.join(root, category), root):
        try:
            meta = read_meta(folder)
        except (StfpmError, OSError, ValueError):
            continue
        if meta.model_id == model_id:
            return meta
    return None


def deployed_threshold(group: CategoryRows, roots: dict[str, str]) -> Deployed:
    """The threshold of the category's model: its checkpoint's, else the one its rows imply.

    Every row stores ``score_norm = score / threshold``, so the ratio gives the threshold back (to float32
    precision, hence the median) even when the checkpoints are out of reach, as on a reporting machine.
    """
    root = roots.get(group.model_id or "")
    meta = _checkpoint_meta(group.name, group.model_id, root) if root and group.model_id else None
    if meta is not None:
        point = meta.operating_point
        record = {key: value for key, value in point.record.items() if key != "scores"}
        history = tuple(p.summary() for p in meta.operating_history)
        return Deployed(point.threshold, "checkpoint", record, point, history)
    ok = group.ok
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = ok["score"].to_numpy(dtype=np.float64) / ok["score_norm"].to_numpy(dtype=np.float64)
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    return Deployed(float(np.median(ratio)), "score / score_norm") if ratio.size else Deployed()


def _example_keys(labelled: pd.DataFrame) -> set[RowKey]:
    """Keys of the highest-scored good and lowest-scored defective rows: the hardest cases to look at."""
    good = labelled[labelled["label"] == 0].nlargest(N_EXAMPLES, "score")
    defective = labelled[labelled["label"] == 1].nsmallest(N_EXAMPLES, "score")
    return {(row.path, int(row.ts)) for row in pd.concat([good, defective]).itertuples()}


def _max_map_value(*frames: pd.DataFrame) -> float:
    """Upper bound of every stored map value (map_scale is each map's maximum); 1.0 for all-zero maps."""
    scales = np.concatenate([frame["map_scale"].to_numpy(dtype=np.float64) for frame in frames])
    top = float(np.nanmax(scales)) if np.isfinite(scales).any() else math.nan
    return top if math.isfinite(top) and top > 0 else 1.0


def _read_mask(category: str, mask_path: str, image_path: str, size: tuple[int, int]) -> np.ndarray:
    try:
        return load_mask(mask_path, size)
    except (OSError, StfpmError) as exc:
        raise UserError(f"{category}: cannot read the ground-truth mask {mask_path} of {image_path}: {exc}") from None


def _map_batches(dataset: ds.Dataset, row_filter: pc.Expression) -> Iterator[pa.RecordBatch]:
    """Record batches of the map columns, one Parquet file at a time.

    ``Dataset.to_batches`` reads ahead across files whenever the consumer is slower than the reader,
    whatever its readahead arguments: on 15 files of 93 MiB of maps it had 1.2 GiB buffered. Scanning
    file by file bounds the buffers by a few times one file's map column.
    """
    columns = [
        "path",
        "category",
        "label",
        "mask_path",
        "defect",
        "score",
        "score_norm",
        "anomaly_map",
        "map_scale",
        "scored_at",
    ]
    for fragment in dataset.get_fragments(filter=row_filter):
        yield from fragment.to_batches(
            schema=dataset.schema, columns=columns, filter=row_filter, batch_size=BATCH_ROWS, batch_readahead=1
        )


def stream_maps(dataset: ds.Dataset, groups: list[CategoryRows]) -> dict[str, PixelPass]:
    """One pass over the maps of ``groups``: pixel metrics and example maps per category."""
    wanted: dict[str, set[RowKey]] = {}
    examples: dict[str, set[RowKey]] = {}
    passes: dict[str, PixelPass] = {}
    flagged_paths: list[str] = []
    for group in groups:
        labelled, flagged = group.labelled, group.top_flagged
        flagged_keys = {(row.path, int(row.ts)) for row in flagged.itertuples()}
        wanted[group.name] = {(row.path, int(row.ts)) for row in labelled.itertuples()} | flagged_keys
        examples[group.name] = _example_keys(labelled) | flagged_keys
        passes[group.name] = PixelPass(metrics.PixelMetrics(_max_map_value(labelled, flagged)))
        flagged_paths += list(flagged["path"])
    # unlabelled rows are read only for the flagged images shown: a nightly table holds millions of maps
    row_filter = (
        pc.field("category").isin(list(wanted))
        & (pc.field("status") == "ok")
        & (pc.field("label").is_valid() | pc.field("path").isin(pa.array(flagged_paths, pa.string())))
    )
    for batch in _map_batches(dataset, row_filter):
        timestamps = _timestamps_us(batch.column("scored_at"))
        for row, ts in zip(batch.drop_columns(["scored_at"]).to_pylist(), timestamps, strict=True):
            key = (row["path"], int(ts))
            if key not in wanted[row["category"]]:
                continue  # another model's row, or an older repeat of this image
            wanted[row["category"]].discard(key)  # exact repeats count once
            _add_row(row, key, passes[row["category"]], key in examples[row["category"]])
    return passes


def _add_row(row: dict, key: RowKey, state: PixelPass, is_example: bool) -> None:
    anomaly_map = decode_map(row["anomaly_map"], row["map_scale"])
    state.map_shapes.add(anomaly_map.shape)
    mask = _read_mask(row["category"], row["mask_path"], row["path"], anomaly_map.shape) if row["mask_path"] else None
    if row["label"] == 1 and mask is None:
        state.without_mask += 1  # its pixels would all count as normal: keep it out of pixel metrics
    elif row["label"] is not None:  # an unlabelled row is here only to be shown
        state.pixel.update(anomaly_map, mask)
    if is_example:
        state.examples[key] = report.Example(
            row["path"], float(row["score"]), row["label"], row["defect"], anomaly_map, mask, row["score_norm"]
        )


def category_metrics(group: CategoryRows, state: PixelPass, notes: list[str]) -> dict:
    """The metrics.json entry of one category."""
    rows, labelled = group.rows, group.labelled
    labels = labelled["label"].to_numpy(dtype=np.int64)
    scores = labelled["score"].to_numpy(dtype=np.float64)
    image_auroc, (f1, threshold) = math.nan, (math.nan, math.nan)
    if len(labelled):
        try:
            image_auroc, (f1, threshold) = metrics.image_auroc(labels, scores), metrics.f1_max(labels, scores)
        except ValueError as exc:  # e.g. a NaN score in an 'ok' row: say which category
            raise UserError(f"{group.name}: {exc}") from None
    if len(state.map_shapes) > 1:
        sizes = ", ".join(f"{height}x{width}" for height, width in sorted(state.map_shapes))
        raise UserError(
            f"{group.name}: anomaly maps of several sizes ({sizes}); "
            "pixel metrics need one resolution: rescore with one map size or pass --model-id"
        )
    if state.without_mask:
        notes.append(f"{group.name}: {state.without_mask} defective images without a mask left out of pixel metrics.")
    auroc_bound, aupro_bound = state.pixel.binning_error_bounds(AUPRO_FPR_LIMIT)
    map_shape = next(iter(state.map_shapes), None)
    ok = rows["status"] == "ok"
    return {
        "image_auroc": image_auroc,
        "pixel_auroc": state.pixel.pixel_auroc(),
        "aupro": state.pixel.aupro(AUPRO_FPR_LIMIT),
        "image_f1_max": f1,
        "image_f1_threshold": threshold,
        "n_images": len(rows),
        "n_good": int((ok & (rows["label"] == 0)).sum()),
        "n_defective": int((ok & (rows["label"] == 1)).sum()),
        "n_unlabeled": int((ok & rows["label"].isna()).sum()),
        "n_errors": int((~ok).sum()),
        "model_id": group.model_id,
        # the stored maps' short side (--map-size) and [height, width]
        "map_size": min(map_shape) if map_shape else None,
        "map_shape": list(map_shape) if map_shape else None,
        "pixel_auroc_max_binning_error": auroc_bound,
        "aupro_max_binning_error": aupro_bound,
        **deployed_metrics(group),
    }


def _quantiles(values: np.ndarray) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if not values.size:
        return {}
    return {
        "p50": float(np.median(values)),
        "p90": float(np.quantile(values, 0.9)),
        "p99": float(np.quantile(values, 0.99)),
        "max": float(values.max()),
    }


def deployed_metrics(group: CategoryRows) -> dict:
    """The category at its deployed threshold: what ``is_anomalous`` decided, against labels where they exist.

    ``score_norm_quantiles`` and ``top_flagged`` describe every ok row, labelled or not, so a nightly table
    without labels still says how many images were flagged, which, and how far the scores are from 1.
    """
    ok, flagged, deployed = group.ok, group.flagged, group.deployed
    labels = ok["label"].fillna(-1).to_numpy(dtype=np.int64)
    point = metrics.operating_point(labels, flagged, ok["defect"].to_numpy(dtype=object))
    unlabelled = ok["label"].isna().to_numpy()
    normalized = pd.Series(group.score_norm, index=ok.index)
    return {
        "threshold": deployed.threshold,
        "threshold_source": deployed.source,
        "calibration": deployed.calibration,
        "operating_point": deployed.point.summary() if deployed.point else {},
        "operating_history": list(deployed.history),
        # an adaptive point decides each scoring run at its own threshold
        "run_thresholds": _run_thresholds(group) if deployed.point and deployed.point.adaptive else {},
        # rows whose stored is_anomalous the point in force decides otherwise (scored before a calibrate)
        "n_decided_anew": int((flagged != group.stored).sum()),
        "drift": _drift(group, labels),
        "n_flagged": int(flagged.sum()),
        "flag_rate": float(flagged.mean()) if flagged.size else math.nan,
        "n_unlabeled_flagged": int((flagged & unlabelled).sum()),
        **point,
        "score_norm_quantiles": _quantiles(normalized.to_numpy()),
        "top_flagged": [
            {"path": row.path, "score": float(row.score), "score_norm": float(normalized[row.Index])}
            for row in group.top_flagged.itertuples()
        ],
    }


def _run_thresholds(group: CategoryRows) -> dict[str, float]:
    """Per scoring run (by id), the threshold that decided its rows."""
    first = group.thresholds.groupby(group.ok["run_id"], dropna=False).first()
    return {str(run): float(threshold) for run, threshold in first.items()}


def _drift(group: CategoryRows, labels: np.ndarray) -> dict:
    """Whether the rows kept the promise of the operating point in force (:mod:`stfpm_ray.evaluate.drift`)."""
    point = group.deployed.point
    if point is None:
        return {"detected": False, "reason": "no checkpoint in reach: no operating point to compare with"}
    return drift.assess(group.ok["score"].to_numpy(dtype=np.float64), labels, point, group.thresholds.to_numpy())


def mean_metrics(per_category: dict[str, dict]) -> dict:
    """Unweighted mean over categories where each metric is defined; counts are totals.

    Thresholds have no mean: raw scores are on a different scale in every category.
    """
    entries = list(per_category.values())
    mean: dict = {}
    for key in METRIC_KEYS + BOUND_KEYS + RATE_KEYS:
        values = [entry[key] for entry in entries if not math.isnan(entry[key])]
        mean[key] = float(np.mean(values)) if values else math.nan
    for key in COUNT_KEYS:
        mean[key] = sum(entry[key] for entry in entries)
    sizes = {entry["map_size"] for entry in entries if entry["map_size"] is not None}
    mean.update(
        image_f1_threshold=math.nan,
        model_id=None,
        map_size=sizes.pop() if len(sizes) == 1 else None,
        threshold=math.nan,
        threshold_source=None,
    )
    mean["n_categories"] = len(entries)
    return mean


def _undefined_notes(per_category: dict[str, dict]) -> list[str]:
    notes = []
    for name, entry in per_category.items():
        undefined = [key for key in METRIC_KEYS if math.isnan(entry[key])]
        if undefined and entry["n_good"] + entry["n_defective"] == 0:
            notes.append(
                f"{name}: no labelled rows (an unlabelled archive): {', '.join(undefined)} undefined, left out of "
                f"the mean; {entry['n_flagged']} of {entry['n_images'] - entry['n_errors']} images flagged."
            )
        elif undefined:
            notes.append(
                f"{name}: {', '.join(undefined)} undefined (they need good and defective images); left out of the mean."
            )
    return notes


def _evaluate_groups(
    dataset: ds.Dataset, groups: list[CategoryRows], notes: list[str], say: Progress
) -> tuple[dict[str, dict], list[report.CategoryDetail]]:
    """Metrics and figure inputs of every category, ``CATEGORIES_PER_PASS`` categories per pass over the maps."""
    per_category: dict[str, dict] = {}
    details: list[report.CategoryDetail] = []
    for start in range(0, len(groups), CATEGORIES_PER_PASS):
        chunk = groups[start : start + CATEGORIES_PER_PASS]
        say(f"streaming anomaly maps of {', '.join(group.name for group in chunk)}")
        passes = stream_maps(dataset, chunk)
        for group in chunk:
            state = passes[group.name]
            per_category[group.name] = category_metrics(group, state, notes)
            labelled, ok = group.labelled, group.ok
            details.append(
                report.CategoryDetail(
                    name=group.name,
                    labels=labelled["label"].to_numpy(dtype=np.int64),
                    scores=labelled["score"].to_numpy(dtype=np.float64),
                    examples=list(state.examples.values()),
                    map_max=state.pixel.max_score,
                    unlabeled_scores=ok.loc[ok["label"].isna(), "score"].to_numpy(dtype=np.float64),
                    reference_scores=np.asarray(group.deployed.point.scores if group.deployed.point else ()),
                )
            )
    return per_category, details


def evaluate_scores(
    scores_dir: str | Path,
    report_dir: str | Path,
    model_id: str | Sequence[str] | None = None,
    progress: Progress | None = log_progress,
    version: int | None = None,
) -> dict:
    """Compute per-category and mean metrics, write metrics.json, metrics.csv and report.html; return the dict.

    ``model_id`` (one id or several, one per category) picks the evaluated models; by default each
    category's most recently scored model is used and a note says when there was a choice.
    """
    say = progress or quiet
    dataset, runs = open_scores(scores_dir, version)
    index = read_index(dataset)
    say(
        f"read {len(index)} rows from {len(dataset.files)} Parquet file(s) of version {runs['table_version']} of "
        f"{scores_dir}"
    )
    notes: list[str] = []
    groups = select_rows(index, [model_id] if isinstance(model_id, str) else model_id, notes)
    for group in groups:
        group.deployed = deployed_threshold(group, runs["checkpoint_roots"])
    per_category, details = _evaluate_groups(dataset, groups, notes, say)
    result = {
        "categories": per_category,
        "mean": mean_metrics(per_category),
        "settings": {
            "scores": str(scores_dir),
            "version": version,
            "table_version": runs["table_version"],
            "inputs": runs["inputs"],
            "checkpoints": sorted(set(runs["checkpoint_roots"].values())),
            "model_ids": {name: entry["model_id"] for name, entry in per_category.items()},
            "pixel_resolution": "anomaly maps as stored (map_shape: height, width); masks reduced to that size",
            "aupro_fpr_limit": AUPRO_FPR_LIMIT,
            "pixel_metrics": report.PIXEL_METRICS_NOTE,
            "f1_max": report.F1_ORACLE_NOTE,
        },
        "notes": notes + _undefined_notes(per_category),
    }
    paths = report.write_report(report_dir, result, details)
    say(report.format_table(result))
    for note in result["notes"]:
        say(f"note: {note}")
    for group in groups:
        if per_category[group.name]["drift"]["detected"]:
            root = runs["checkpoint_roots"].get(group.model_id or "", "CKPT_DIR")
            say(drift.drift_line(group.name, per_category[group.name]["drift"], root))
    say(f"wrote {', '.join(str(path) for path in paths)}")
    return result
