"""The scores table: a Delta Lake table at ``OUT_DIR``, one atomic commit per scoring run.

Why Delta Lake: a path is a table (no catalog server), every commit is one file in ``_delta_log/`` that is
either there or not, and the tools users already have read it (``deltalake``, Polars, Spark, DuckDB's
``delta`` extension, or Arrow from ``deltalake`` into pandas/DuckDB). A reader therefore never sees a run's
files before its commit, never half a commit, and never a doubled row after a crash.

Why not a plain ``write_delta``: a run must do three things in one commit, which Ray's ``write_delta``
(append or overwrite only) cannot: add its files, remove the error rows it retried, and record its
manifest in the commit's metadata. So scoring workers write plain Parquet files into ``OUT_DIR`` (through
:func:`write_data_files`, which also computes each file's statistics for the log) and the driver publishes
them with ``deltalake``'s transaction API (:mod:`stfpm_ray.store.publish`, which holds the lease around the
whole run).

Layout of the files (the Delta log, not the folder, says which files are live):

* ``<run_id>-<task>.parquet``: a write task's ``ok`` rows, ``<run_id>-<task>-errors.parquet`` its error
  rows. Error rows live in files of their own, so retrying them rewrites only tiny error files, never the
  files that hold maps.
* ``_stfpm/lease.json``: the writer's lease (:mod:`stfpm_ray.store.lease`); ``_stfpm/runs/<run_id>.json``:
  the record of a run that has begun and not finished, written before its first data file;
  ``_stfpm/runs/<run_id>/``: the per-process records of a running run, folded into its manifest at commit.

A run that dies before its commit leaves data files that no commit references: readers never see them, the
run deletes its own on failure, and a run killed before it could (``kill -9``, a lost node) left its record,
so the next run into the folder deletes them under the lease (:meth:`ScoresTable.recover`), a table or not
yet. Files without a record are never deleted: a folder holding them is refused as not ours.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable, Schema
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, RemoveAction, create_table_with_add_actions

from stfpm_ray.errors import InputNotFoundError, OutputExistsError, TableError, UserError
from stfpm_ray.store.fs import Location, list_dir, read_text, remove_empty, resolve, write_text_atomic
from stfpm_ray.store.lease import STATE


def _fields(**types: pa.DataType) -> list[pa.Field]:
    return [pa.field(name, kind) for name, kind in types.items()]


# What the layout says about an input image (filled when the run is planned, before any scoring).
SAMPLE_FIELDS = _fields(
    path=pa.string(),
    category=pa.string(),
    label=pa.int8(),
    defect=pa.string(),
    mask_path=pa.string(),
    model_id=pa.string(),
)
# What scoring adds (stfpm_ray.core.score.ScoredImage), then when, by which run and how it went.
RESULT_FIELDS = _fields(
    score=pa.float32(),
    score_norm=pa.float32(),
    is_anomalous=pa.bool_(),
    anomaly_map=pa.binary(),
    map_scale=pa.float32(),
    runtime=pa.string(),
)
RUN_FIELDS = _fields(run_id=pa.string(), scored_at=pa.timestamp("us", tz="UTC"), status=pa.string(), error=pa.string())
_ORDER = [
    "path",
    "category",
    "score",
    "score_norm",
    "is_anomalous",
    "label",
    "defect",
    "mask_path",
    "anomaly_map",
    "map_scale",
    "model_id",
    "runtime",
    "run_id",
    "scored_at",
    "status",
    "error",
]
# One row per (input image, model); evaluate and users read exactly these columns, in this order.
SCHEMA = pa.schema(sorted(SAMPLE_FIELDS + RESULT_FIELDS + RUN_FIELDS, key=lambda f: _ORDER.index(f.name)))
INDEX_COLUMNS = ["path", "category", "status", "model_id"]
# Columns added after the first tables were written, newest last: older data files lack them (read as null)
# and an older table gains them with the first commit of a run that writes them (ScoresTable.change).
ADDED_COLUMNS = ("runtime",)
# The commit metadata key that holds a run's manifest (see ScoresTable.history).
MANIFEST_KEY = "stfpm_ray.manifest"
RUNS = f"{STATE}/runs"
LOG = "_delta_log"
FILES_PER_SCAN = 256
ERRORS_SUFFIX = "-errors.parquet"
# Rows per Parquet file a write task aims at (and compaction): files of a few MB to tens of MB.
ROWS_PER_FILE = 2048
# Live error files an incremental run reads and rewrites in place; beyond this it merges them into one.
MAX_ERROR_FILES = 64


# Columns whose minimum and maximum a data file's log entry records: every column but the maps (bytes that no
# one filters on). Readers that filter (DuckDB, Polars, Spark, a pyarrow dataset from deltalake) skip the
# files whose range excludes the filter, e.g. every file of other categories for ``category == 'screw'``. All
# or nothing: deltalake's pyarrow dataset reads a column missing from stats that others have as "no rows
# match" (measured with deltalake 1.6: a filter on ``score`` then found no rows).
STATS_COLUMNS = tuple(field.name for field in SCHEMA if not pa.types.is_binary(field.type))


def file_stats(rows: pa.Table) -> str:
    """The Delta ``stats`` of a data file: row count, and per :data:`STATS_COLUMNS` minimum, maximum and nulls.

    Strings are stored whole, not truncated to a prefix as some writers do (a path's prefix is no upper bound);
    timestamps in the ISO form the Delta protocol uses.
    """
    minimum, maximum, nulls = {}, {}, {}
    for name in STATS_COLUMNS:
        column = rows[name]
        nulls[name] = column.null_count
        extremes = pc.min_max(column)
        if extremes["min"].is_valid:
            minimum[name], maximum[name] = _stat_value(extremes["min"]), _stat_value(extremes["max"])
    if not all(math.isfinite(v) for v in [*minimum.values(), *maximum.values()] if isinstance(v, float)):
        # JSON has no NaN or infinity; a file without ranges is read whole, which is always correct
        return json.dumps({"numRecords": rows.num_rows})
    return json.dumps({"numRecords": rows.num_rows, "minValues": minimum, "maxValues": maximum, "nullCount": nulls})


def _stat_value(scalar: pa.Scalar) -> Any:
    if pa.types.is_timestamp(scalar.type):
        return scalar.as_py().isoformat(timespec="microseconds").replace("+00:00", "Z")
    return scalar.as_py()


@dataclass(frozen=True)
class DataFile:
    """A Parquet file a write task put into the table folder, not yet committed, with its Delta ``stats``."""

    name: str
    size: int
    rows: int
    stats: str

    def add_action(self, data_change: bool = True) -> AddAction:
        """The log entry that adds this file; ``data_change=False`` for a rewrite of rows already in the table
        (compaction), so that readers of the change feed skip it."""
        return AddAction(
            path=self.name,
            size=self.size,
            partition_values={},
            modification_time=int(time.time() * 1000),
            data_change=data_change,
            stats=self.stats,
        )


def conform(rows: pa.Table) -> pa.Table:
    """Rows of a data file of any version in today's ``SCHEMA``: columns added since it was written are null."""
    for name in ADDED_COLUMNS:
        if name not in rows.column_names:
            rows = rows.append_column(SCHEMA.field(name), pa.nulls(rows.num_rows, SCHEMA.field(name).type))
    return rows.select(SCHEMA.names).cast(SCHEMA)


def is_scores_schema(schema: pa.Schema) -> bool:
    """Whether a data file's columns are a scores table's, of today or of a version before ``ADDED_COLUMNS``."""
    names = set(schema.names)
    expected = pa.schema([field for field in SCHEMA if field.name in names])
    return set(SCHEMA.names) - names <= set(ADDED_COLUMNS) and schema.remove_metadata().equals(expected)


def write_data_files(table: pa.Table, root: Location, stem: str) -> list[DataFile]:
    """Write a task's rows as ``<stem>.parquet`` (ok rows) and ``<stem>-errors.parquet`` (error rows).

    Names derive from the run and the task, so a retried task overwrites its own files instead of adding
    orphans. Runs on the scoring workers.
    """
    written = []
    is_error = pc.equal(table["status"], "error")
    for rows, name in (
        (table.filter(pc.invert(is_error)), f"{stem}.parquet"),
        (table.filter(is_error), f"{stem}{ERRORS_SUFFIX}"),
    ):
        if rows.num_rows:
            path = posixpath.join(root.path, name)
            rows = rows.cast(SCHEMA)
            pq.write_table(rows, path, filesystem=root.filesystem)
            written.append(DataFile(name, root.filesystem.get_file_info(path).size, rows.num_rows, file_stats(rows)))
    return written


def _key(table: pa.Table) -> pa.ChunkedArray:
    """``path`` and ``model_id`` as one string (null when the model is): the identity of a row."""
    return pc.binary_join_element_wise(table["path"], table["model_id"], "\n")


class ScoresTable:
    """``OUT_DIR`` as a Delta table: mode checks, the incremental index, worker records and the commit."""

    def __init__(self, uri: str) -> None:
        self.uri = str(uri)
        self.location = resolve(uri)
        fs = self.location.filesystem
        if self.location.prefix and not isinstance(fs, (pafs.S3FileSystem, pafs.GcsFileSystem)):
            raise UserError(f"--out {uri}: a scores table must be a local folder or an s3:// or gs:// URI")
        self.table_uri = self.location.name if self.location.prefix else self.location.path

    # ------------------------------------------------------------------------------------ reading

    def exists(self) -> bool:
        return DeltaTable.is_deltatable(self.table_uri)

    def delta(self, version: int | None = None) -> DeltaTable:
        """The table at ``version`` (default: the current one), or one line that says what is wrong."""
        try:
            return DeltaTable(self.table_uri, version=version)
        except TableNotFoundError:
            raise InputNotFoundError(
                f"{self.uri} is not a scores table (no _delta_log): write one with `stfpm-ray score`"
            ) from None
        except Exception as exc:  # deltalake reports a missing version and a damaged log as one generic error
            reason = str(exc).splitlines()[0]
            if version is not None and (version < 0 or version > max(self.log_versions(), default=-1)):
                raise UserError(f"{self.uri} has no version {version}: {reason}") from None
            raise TableError(
                f"scores table {self.uri}: its transaction log cannot be read ({reason}); run `stfpm-ray table "
                f"check --scores {self.uri}` to see the damage and `stfpm-ray table repair --scores {self.uri}` "
                "to fall back to the last readable version"
            ) from None

    def log_versions(self) -> list[int]:
        """The versions whose commit files are in ``_delta_log/``, oldest first (readable or not)."""
        names = (entry.base_name for entry in list_dir(self.location.join(LOG)))
        return sorted(int(name[:-5]) for name in names if name.endswith(".json") and name[:-5].isdigit())

    def intact(self, version: int | None = None) -> DeltaTable:
        """:meth:`delta`, refusing a table whose data files are not all there (deleted by hand or by a
        lifecycle rule): every reader would otherwise fail halfway with a traceback."""
        delta = self.delta(version)
        missing = self.missing_files(delta)
        if missing:
            raise TableError(
                f"scores table {self.uri}: {len(missing)} data file(s) of version {delta.version()} are missing "
                f"(e.g. {missing[0]}); run `stfpm-ray table repair --scores {self.uri}` to drop them from the "
                "table in one commit (the next nightly then scores their images again)"
            )
        return delta

    def missing_files(self, delta: DeltaTable) -> list[str]:
        """The names of ``delta``'s live data files that are not in the folder."""
        present = {entry.base_name for entry in list_dir(self.location)}
        return [name for name in (posixpath.basename(uri) for uri in delta.file_uris()) if name not in present]

    def dataset(self, version: int | None = None) -> pads.Dataset:
        """The live rows as a pyarrow dataset: only files of the chosen version, never staged or removed ones."""
        return self.delta(version).to_pyarrow_dataset()

    def run_rows(self, version: int, run_id: str, columns: list[str]) -> pa.Table:
        """The rows one run wrote, as of ``version``; the filter reaches the Parquet reader and the files'
        statistics, so other runs' files are skipped."""
        return self.dataset(version).to_table(columns=columns, filter=pc.field("run_id") == run_id)

    def history(self) -> list[dict[str, Any]]:
        """``[{version, timestamp, operation, manifest}]``, newest first; manifest None for foreign commits.

        Always read from the current table: deltalake 1.x numbers the history of a table loaded at an older
        version wrongly (it lists the newest commits, counting down from that version)."""
        entries = []
        for commit in self.delta().history():
            manifest = commit.get(MANIFEST_KEY)
            entries.append(
                {
                    "version": commit["version"],
                    "timestamp": commit.get("timestamp"),
                    "operation": commit.get("operation"),
                    "manifest": json.loads(manifest) if manifest else None,
                }
            )
        return entries

    # ---------------------------------------------------------------------------------- planning

    def check_mode(self, mode: str) -> bool:
        """Whether a table is there; refuses a plain run into a table and a folder that holds other things."""
        if self.exists():
            if mode == "plain":
                raise OutputExistsError(
                    f"{self.uri} already holds a scores table (version {self.delta().version()}); pass "
                    "--incremental to score only images without an ok row for their model, or --overwrite "
                    "to replace it"
                )
            if mode == "incremental":
                self.intact()  # the plan reads every live file
            else:
                self.delta()  # the commit reads the log
            return True
        info = self.location.filesystem.get_file_info(self.location.path)
        if info.type == pafs.FileType.File:
            raise OutputExistsError(f"{self.uri} exists and is not a folder")
        foreign = [e.base_name for e in list_dir(self.location) if e.base_name != STATE]
        if "_manifests" in foreign:
            raise OutputExistsError(
                f"{self.uri} holds plain Parquet output of an earlier stfpm-ray (before scores tables); "
                "score into a new --out folder (the old files stay readable with pandas.read_parquet)"
            )
        if foreign:
            raise OutputExistsError(
                f"{self.uri} is not a scores table but holds {', '.join(foreign[:3])}"
                f"{' ...' if len(foreign) > 3 else ''}; choose an empty or new --out folder"
            )
        return False

    def already_scored(self, keys: pa.Table) -> pa.Array:
        """For each ``(path, model_id)`` of ``keys``: does the table hold an ``ok`` row for it?

        The scan pushes the filter (status ok, one of these models, one of these paths) into the Parquet
        reader and reads only the key columns, so the driver holds the matches, not the archive. It opens
        :data:`FILES_PER_SCAN` files at a time because a pyarrow dataset keeps every file's footer once
        read (about 50 KB each): over a whole 10M-row table that alone was 240 MB.
        """
        if keys.num_rows == 0 or not self.exists():
            return pa.array([False] * keys.num_rows, pa.bool_())
        models = pc.unique(keys["model_id"].drop_null())
        wanted = (
            (pc.field("status") == "ok")
            & pc.field("model_id").isin(models)
            & pc.field("path").isin(pc.unique(keys["path"]))
        )
        files = self._live_paths()
        found = [
            pads.dataset(files[i : i + FILES_PER_SCAN], filesystem=self.location.filesystem, format="parquet").to_table(
                columns=["path", "model_id"], filter=wanted
            )
            for i in range(0, len(files), FILES_PER_SCAN)
        ]
        matches = _key(pa.concat_tables(found)).combine_chunks() if found else pa.array([], pa.string())
        return pc.fill_null(pc.is_in(_key(keys), value_set=matches), False)

    def _live_paths(self) -> list[str]:
        """The current version's data files as paths inside the table's filesystem (all at its top level)."""
        return [posixpath.join(self.location.path, posixpath.basename(uri)) for uri in self.delta().file_uris()]

    def retried_errors(self, paths: pa.Array, run_id: str) -> tuple[list[str], list[DataFile]]:
        """Error rows of ``paths`` that this run scores again: files to remove, and their other rows rewritten.

        Only the small error files are read and rewritten (written here, committed with the run). Error rows
        of files that never come back stay, so their files would pile up night after night: beyond
        :data:`MAX_ERROR_FILES` live error files, all of them are merged into one in the same commit.
        """
        if not self.exists():
            return [], []
        errors = sorted(p for p in self._live_paths() if p.endswith(ERRORS_SUFFIX))
        merge = len(errors) > MAX_ERROR_FILES
        removed, rests = [], []
        wanted = pc.unique(paths)
        for path in errors:
            rows = conform(pq.read_table(path, filesystem=self.location.filesystem))
            retried = pc.is_in(rows["path"], value_set=wanted)
            if not merge and not pc.any(retried).as_py():
                continue
            removed.append(posixpath.basename(path))
            rest = rows.filter(pc.invert(retried))
            if rest.num_rows:
                rests.append(rest)
        groups = [pa.concat_tables(rests)] if merge and rests else rests
        kept = [
            file
            for i, rest in enumerate(groups)
            for file in write_data_files(rest, self.location, f"{run_id}-kept-{i:05d}")
        ]
        return removed, kept

    def read_index(self, files: list[DataFile]) -> pa.Table:
        """The INDEX_COLUMNS of a run's own (uncommitted) files, for the check before its commit."""
        if not files:
            return SCHEMA.empty_table().select(INDEX_COLUMNS)
        paths = [posixpath.join(self.location.path, f.name) for f in files]
        return pads.dataset(paths, filesystem=self.location.filesystem, format="parquet").to_table(
            columns=INDEX_COLUMNS
        )

    # ------------------------------------------------------------------------------- run records

    def _run_state(self, run_id: str, *parts: str) -> Location:
        return self.location.join(RUNS, run_id, *parts)

    def record_worker(self, run_id: str, record: dict[str, Any]) -> None:
        """Called by scoring actors: their host, pid and progress, kept for the manifest."""
        write_text_atomic(self._run_state(run_id, f"{record['host']}-{record['pid']}.json"), json.dumps(record))

    def worker_records(self, run_id: str) -> list[dict[str, Any]]:
        """The progress records the run's scoring processes wrote (:meth:`record_worker`)."""
        folder = self._run_state(run_id)
        return [json.loads(read_text(folder.at(e.path))) for e in list_dir(folder) if e.base_name.endswith(".json")]

    def begin_run(self, record: dict[str, Any]) -> None:
        """Record a run before it writes anything (``_stfpm/runs/<run_id>.json``: who, where, when): every data
        file named ``<run_id>-*.parquet`` is then recognisably this run's, and if the run dies before its
        commit, the next lease holder knows whose files it may delete (:meth:`recover`)."""
        write_text_atomic(self.location.join(RUNS, f"{record['run_id']}.json"), json.dumps(record))

    def end_run(self, run_id: str) -> None:
        """Delete a finished run's record and progress records (the ``runs`` folder too, once empty)."""
        folder = self.location.join(RUNS)
        for entry in list_dir(folder):
            if entry.base_name in (run_id, f"{run_id}.json"):
                _delete(folder.at(entry.path), entry.type)
        remove_empty([folder])

    def recover(self) -> dict[str, int]:
        """Delete what runs that died before their commit left: their uncommitted data files and records.

        Called by the lease holder before it reads anything, so none of the recorded runs is alive (a run
        only paused past its lease commits nothing). A recorded run's files that the current version holds
        were committed (the run died after its log entry) and stay. Returns ``{run_id: files deleted}``.
        """
        folder = self.location.join(RUNS)
        records = list_dir(folder)
        if not records:
            return {}
        dead = sorted({entry.base_name.removesuffix(".json") for entry in records})
        live = {posixpath.basename(path) for path in self._live_paths()} if self.exists() else set()
        entries = list_dir(self.location)
        removed = {}
        for run_id in dead:
            orphans = [e for e in entries if _written_by(e.base_name, run_id) and e.base_name not in live]
            for entry in orphans:
                self.location.filesystem.delete_file(entry.path)
            self.end_run(run_id)
            removed[run_id] = len(orphans)
        return removed

    def discard(self, run_id: str) -> bool:
        """After a failed run: delete its own uncommitted data files. False when some could not be deleted
        (the run's record then stays, and the next run's :meth:`recover` deletes them)."""
        try:
            for entry in list_dir(self.location):
                if _written_by(entry.base_name, run_id):
                    self.location.filesystem.delete_file(entry.path)
        except OSError:
            return False
        return True

    # ------------------------------------------------------------------------------------ commit

    def commit(self, files: list[DataFile], removed: list[str], manifest: dict[str, Any], overwrite: bool) -> int:
        """Publish a run as one Delta commit (add its files, remove retried error files, record the manifest);
        returns the new version. Until this returns, readers see the previous version unchanged."""
        adds = [f.add_action() for f in files]
        metadata = {MANIFEST_KEY: json.dumps(manifest, sort_keys=True)}
        if not self.exists():
            create_table_with_add_actions(
                self.table_uri,
                Schema.from_arrow(SCHEMA),
                adds,
                mode="error",
                commit_properties=CommitProperties(custom_metadata=metadata),
            )
            return 0
        if overwrite:
            return self.change(adds, [], metadata, mode="overwrite")
        return self.change(adds, removed, metadata)

    def change(
        self,
        adds: list[AddAction],
        removed: list[str],
        metadata: dict[str, str],
        data_change: bool = True,
        mode: str = "append",
    ) -> int:
        """One commit to the existing table: ``adds``, the removal of the files named ``removed`` and the commit
        ``metadata`` (a run's manifest, a repair's or a compaction's record); returns the new version.
        ``data_change`` false marks removals that drop no row (a compaction)."""
        now = int(time.time() * 1000)
        removes = [RemoveAction(path=name, data_change=data_change, deletion_timestamp=now) for name in removed]
        delta = self.delta()
        have = {column.name for column in delta.schema().fields}
        if added := [field for field in SCHEMA if field.name not in have]:
            # a table from before ADDED_COLUMNS: declare them first, or the log would drop them from these files
            delta.alter.add_columns(Schema.from_arrow(pa.schema(added)).fields)
        self.delta().create_write_transaction(
            [*adds, *removes], mode=mode, schema=SCHEMA, commit_properties=CommitProperties(custom_metadata=metadata)
        )
        return self.delta().version()


def _written_by(name: str, run_id: str) -> bool:
    """Whether a file name in the table folder is one of ``run_id``'s data files (:func:`write_data_files`)."""
    return name.startswith(f"{run_id}-") and name.endswith(".parquet")


def _delete(location: Location, kind: pafs.FileType) -> None:
    if kind == pafs.FileType.Directory:
        location.filesystem.delete_dir(location.path)
    else:
        location.filesystem.delete_file(location.path)


def counts_by_category(index: pa.Table) -> dict[str, dict[str, int]]:
    """``{category: {"ok": n, "error": n}}`` from index columns."""
    grouped = index.group_by(["category", "status"]).aggregate([("path", "count")]).to_pylist()
    counts: dict[str, dict[str, int]] = {}
    for row in grouped:
        counts.setdefault(row["category"], {"ok": 0, "error": 0})[row["status"]] = row["path_count"]
    return counts


def duplicated_paths(index: pa.Table) -> list[str]:
    """Paths that occur more than once among a run's rows (must be none)."""
    grouped = index.group_by("path").aggregate([("path", "count")])
    return grouped.filter(pc.greater(grouped["path_count"], 1))["path"].to_pylist()
