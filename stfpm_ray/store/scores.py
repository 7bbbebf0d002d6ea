"""The scoring output folder: row schema, atomic commits, manifests and the incremental index.

``OUT_DIR`` (a local folder or an ``s3://``/``gs://`` URI) holds only data files at its top level, so
``pandas.read_parquet(OUT_DIR)`` and ``pyarrow.parquet.read_table(OUT_DIR)`` read it as it is; everything
else starts with ``_``, which both readers skip:

* ``_staging-<run_id>/`` receives a run's Parquet files while it scores. Nothing in ``OUT_DIR`` changes
  until the whole dataset is written and checked (one row per image to score, no path twice).
* The commit first writes ``_staging-<run_id>/_commit.json`` (the moves, the files an ``--overwrite``
  replaces, and the manifest), then applies it: moves ``<run_id>-NNNNN.parquet`` into ``OUT_DIR``, deletes
  replaced files, writes ``_manifests/<run_id>.json`` and removes the staging folder. Every step is
  idempotent, so a run killed during the commit is finished by the next run (roll forward); a staging
  folder without ``_commit.json`` belongs to a run that died before committing and is deleted. Only one
  run may write to an ``OUT_DIR`` at a time: a new run treats every other staging folder as abandoned.
* ``_staging-<run_id>/_workers/<host>-<pid>.json`` is kept up to date by each scoring actor process
  (batches and rows done, peak resident memory), so the manifest records which processes did the work
  and a restarted actor shows up as a second process.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from stfpm_ray.errors import OutputExistsError, UserError
from stfpm_ray.progress import Progress
from stfpm_ray.store.fs import Location, read_text, resolve, write_text_atomic


def _fields(**types: pa.DataType) -> list[pa.Field]:
    return [pa.field(name, kind) for name, kind in types.items()]


# What the layout says about an input image (filled when the run is planned, before any scoring).
SAMPLE_FIELDS = _fields(path=pa.string(), category=pa.string(), label=pa.int8(), defect=pa.string(),
                        mask_path=pa.string(), model_id=pa.string())
# What scoring adds (stfpm_ray.core.score.ScoredImage), then when and how it went.
RESULT_FIELDS = _fields(score=pa.float32(), score_norm=pa.float32(), is_anomalous=pa.bool_(),
                        anomaly_map=pa.binary(), map_scale=pa.float32())
RUN_FIELDS = _fields(scored_at=pa.timestamp("us", tz="UTC"), status=pa.string(), error=pa.string())
_ORDER = ["path", "category", "score", "score_norm", "is_anomalous", "label", "defect", "mask_path", "anomaly_map",
          "map_scale", "model_id", "scored_at", "status", "error"]
# One row per input image; evaluate and users read exactly these columns, in this order.
SCHEMA = pa.schema(sorted(SAMPLE_FIELDS + RESULT_FIELDS + RUN_FIELDS, key=lambda f: _ORDER.index(f.name)))
INDEX_COLUMNS = ["path", "category", "status", "model_id"]
STAGING_PREFIX = "_staging-"
MANIFESTS = "_manifests"
WORKERS = "_workers"
COMMIT_FILE = "_commit.json"


@dataclass(frozen=True)
class StagedRun:
    """What a run wrote into its staging folder, as read back from the files themselves."""

    files: list[str]
    rows_per_file: list[int]
    index: pa.Table  # INDEX_COLUMNS of every staged row


class OutputFolder:
    """One ``OUT_DIR``: checks before a run, the incremental index, staging and commit."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        location = resolve(uri)
        self.fs, self.root = location.filesystem, location.path

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _entries(self, path: str | None = None) -> list[pafs.FileInfo]:
        info = self.fs.get_file_info(path or self.root)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type != pafs.FileType.Directory:
            raise OutputExistsError(f"{self.uri if path is None else path} exists and is not a folder")
        return self.fs.get_file_info(pafs.FileSelector(path or self.root))

    def data_files(self) -> list[str]:
        """Top-level Parquet files (the dataset); refuses a folder that also holds other visible things."""
        visible = [e for e in self._entries() if not e.base_name.startswith(("_", "."))]
        foreign = [e.base_name for e in visible if e.type != pafs.FileType.File or not e.base_name.endswith(".parquet")]
        if foreign:
            raise OutputExistsError(
                f"{self.uri} holds entries that are not scoring output ({', '.join(sorted(foreign)[:3])}); "
                "choose an empty or new --out folder"
            )
        return sorted(e.path for e in visible)

    def check_mode(self, incremental: bool, overwrite: bool) -> list[str]:
        """The data files already there; a plain run into a folder that has some is refused."""
        if incremental and overwrite:
            raise UserError("--incremental and --overwrite exclude each other")
        existing = self.data_files()
        if existing and not (incremental or overwrite):
            raise OutputExistsError(
                f"{self.uri} already holds scoring output ({len(existing)} Parquet files); pass --incremental "
                "to score only images without a row for their model, or --overwrite to replace it"
            )
        return existing

    def scored_keys(self) -> dict[str, set[str | None]]:
        """``path -> model ids`` that already have a row (ok or error), for incremental runs."""
        if not self.data_files():
            return {}
        table = pads.dataset(self.root, filesystem=self.fs, format="parquet").to_table(columns=["path", "model_id"])
        keys: dict[str, set[str | None]] = {}
        for path, model_id in zip(table.column("path").to_pylist(), table.column("model_id").to_pylist()):
            keys.setdefault(path, set()).add(model_id)
        return keys

    def recover(self, progress: Progress) -> None:
        """Finish runs that died during their commit; delete staging folders of runs that died earlier."""
        for entry in self._entries():
            if entry.type != pafs.FileType.Directory or not entry.base_name.startswith(STAGING_PREFIX):
                continue
            intent = self.fs.get_file_info(posixpath.join(entry.path, COMMIT_FILE))
            if intent.type == pafs.FileType.File:
                progress(f"finishing the interrupted commit of run {entry.base_name[len(STAGING_PREFIX):]}")
                self._apply(json.loads(self._read_text(intent.path)), entry.path)
            else:
                progress(f"removing {entry.base_name} left by a run that did not finish")
                self.fs.delete_dir(entry.path)

    def start_staging(self, run_id: str) -> str:
        """Create the staging folder of a run (workers write their records there before any data)."""
        staging = self._join(STAGING_PREFIX + run_id)
        self.fs.create_dir(posixpath.join(staging, WORKERS), recursive=True)
        return staging

    def discard(self, staging: str) -> None:
        """Delete a run's staging folder after a failure (best effort: the next run retries)."""
        try:
            self.fs.delete_dir(staging)
        except OSError:
            pass

    def record_worker(self, staging: str, record: dict[str, Any]) -> None:
        """Called by scoring actors: their host, pid and progress, kept for the manifest."""
        name = f"{record['host']}-{record['pid']}.json"
        self._write_text(posixpath.join(staging, WORKERS, name), json.dumps(record))

    def read_staging(self, staging: str) -> StagedRun:
        files = sorted(
            e.path for e in self._entries(staging) if e.type == pafs.FileType.File and e.base_name.endswith(".parquet")
        )
        if not files:
            return StagedRun([], [], SCHEMA.empty_table().select(INDEX_COLUMNS))
        dataset = pads.dataset(files, filesystem=self.fs, format="parquet")
        rows = [fragment.count_rows() for fragment in dataset.get_fragments()]
        return StagedRun(files, rows, dataset.to_table(columns=INDEX_COLUMNS))

    def worker_records(self, staging: str) -> list[dict[str, Any]]:
        entries = self._entries(posixpath.join(staging, WORKERS))
        return [json.loads(self._read_text(e.path)) for e in entries if e.base_name.endswith(".json")]

    def commit(self, run_id: str, staged: StagedRun, manifest: dict[str, Any], replace: Iterable[str]) -> str:
        """Move the staged files into place and write the manifest; returns the manifest's path."""
        staging = self._join(STAGING_PREFIX + run_id)
        moves = [[src, self._join(f"{run_id}-{i:05d}.parquet")] for i, src in enumerate(staged.files)]
        manifest = {
            **manifest,
            "files": [{"name": posixpath.basename(dst), "rows": n} for (_, dst), n in zip(moves, staged.rows_per_file)],
        }
        replaced = sorted(replace)
        if replaced:
            replaced += [e.path for e in self._entries(self._join(MANIFESTS)) if e.type == pafs.FileType.File]
        intent = {"moves": moves, "delete": replaced, "manifest": manifest, "run_id": run_id}
        self._write_text(posixpath.join(staging, COMMIT_FILE), json.dumps(intent, indent=2))
        return self._apply(intent, staging)

    def _apply(self, intent: dict[str, Any], staging: str) -> str:
        """Idempotent: every step checks what is already done, so it can be repeated after a crash."""
        for src, dst in intent["moves"]:
            if self.fs.get_file_info(src).type == pafs.FileType.File:
                self.fs.move(src, dst)
        for path in intent["delete"]:
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                self.fs.delete_file(path)
        manifest_path = self._join(MANIFESTS, f"{intent['run_id']}.json")
        self.fs.create_dir(self._join(MANIFESTS), recursive=True)
        self._write_text(manifest_path, json.dumps(intent["manifest"], indent=2, sort_keys=True))
        self.fs.delete_dir(staging)
        return manifest_path

    def _read_text(self, path: str) -> str:
        return read_text(Location(self.fs, path))

    def _write_text(self, path: str, text: str) -> None:
        write_text_atomic(Location(self.fs, path), text)


def counts_by_category(index: pa.Table) -> dict[str, dict[str, int]]:
    """``{category: {"ok": n, "error": n}}`` from staged index columns."""
    grouped = index.group_by(["category", "status"]).aggregate([("path", "count")]).to_pylist()
    counts: dict[str, dict[str, int]] = {}
    for row in grouped:
        counts.setdefault(row["category"], {"ok": 0, "error": 0})[row["status"]] = row["path_count"]
    return counts


def duplicated_paths(index: pa.Table) -> list[str]:
    """Paths that occur more than once among staged rows (must be none)."""
    grouped = index.group_by("path").aggregate([("path", "count")])
    return grouped.filter(pc.greater(grouped["path_count"], 1))["path"].to_pylist()
