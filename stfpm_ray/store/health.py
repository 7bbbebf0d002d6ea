"""Checking, mending and tidying a scores table: what ``stfpm-ray table check|repair|compact|vacuum`` does.

Why it exists: a table lives for years on storage that people and lifecycle rules also touch. A deleted data
file or a truncated log entry must not leave every later night failing; it is found (:func:`check`), and
mended in a way the next ``nightly`` completes (:func:`repair`): a missing or unreadable data file is dropped
from the table in one commit, so its images have no row and are scored again; a log entry that cannot be
read is moved aside with every entry after it, so the table is the last version that loads, and the images
of the commits set aside are scored again. Nothing is deleted: log entries go to ``_stfpm/damaged/``, and
files no version needs any more are left to :func:`vacuum`.

And a table that sees a run every night collects a small file and a log entry per night, which every reader
opens: :func:`compact` merges the small files, :func:`vacuum` deletes what no recent version needs and
checkpoints the log.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable

from stfpm_ray.errors import TableError
from stfpm_ray.store.fs import list_dir
from stfpm_ray.store.lease import STATE
from stfpm_ray.store.scores import (
    ERRORS_SUFFIX,
    LOG,
    ROWS_PER_FILE,
    ScoresTable,
    conform,
    is_scores_schema,
    write_data_files,
)

# The commit metadata keys of a repair and a compaction (foreign commits for readers of run manifests).
REPAIR_KEY = "stfpm_ray.repair"
COMPACT_KEY = "stfpm_ray.compaction"
DAMAGED = f"{STATE}/damaged"
# `table vacuum` keeps the files of the last week's versions, so `evaluate --version N` works for that long.
DEFAULT_RETENTION_HOURS = 168


@dataclass
class Health:
    """What :func:`check` found. ``version`` is the newest version that loads (None: none does)."""

    uri: str
    version: int | None
    newest: int | None  # the newest log entry present, readable or not
    missing: list[str] = field(default_factory=list)  # live data files that are gone
    unreadable: dict[str, str] = field(default_factory=dict)  # live data files that cannot be read as ours
    rows: int = 0

    @property
    def damaged_log(self) -> bool:
        return self.newest is not None and self.version != self.newest

    @property
    def healthy(self) -> bool:
        return not (self.damaged_log or self.missing or self.unreadable)

    def lines(self) -> list[str]:
        """One line per finding, the first one saying whether the table is healthy."""
        if self.version is None:
            return [f"{self.uri}: no version of the transaction log can be read"]
        head = f"{self.uri}: version {self.version}, {self.rows} rows"
        found = [head + (": healthy" if self.healthy else ": damaged")]
        if self.damaged_log:
            found.append(f"log entries {self.version + 1}..{self.newest} cannot be read")
        found += [f"data file missing: {name}" for name in self.missing]
        found += [f"data file unreadable: {name}: {why}" for name, why in sorted(self.unreadable.items())]
        return found


def _newest_loadable(table: ScoresTable, versions: list[int]) -> DeltaTable | None:
    for version in [None, *reversed(versions)]:
        try:
            return DeltaTable(table.table_uri, version=version)
        except Exception:  # a damaged entry at or below this version: try the one before
            continue
    return None


def check(table: ScoresTable) -> Health:
    """Whether every log entry loads, and every live data file is there and reads with the table's schema."""
    versions = table.log_versions()
    delta = _newest_loadable(table, versions)
    health = Health(table.uri, None if delta is None else delta.version(), versions[-1] if versions else None)
    if delta is None:
        return health
    health.missing = table.missing_files(delta)
    for name in (posixpath.basename(uri) for uri in delta.file_uris()):
        if name in health.missing:
            continue
        try:
            metadata = pq.read_metadata(table.location.join(name).path, filesystem=table.location.filesystem)
        except (OSError, pa.ArrowException) as exc:
            health.unreadable[name] = str(exc).splitlines()[0]
            continue
        if not is_scores_schema(metadata.schema.to_arrow_schema()):
            health.unreadable[name] = "its columns are not those of a scores table"
        health.rows += metadata.num_rows
    return health


def repair(table: ScoresTable) -> Health:
    """Make the table load and read again (see the module doc); the caller holds the lease. Returns what
    :func:`check` finds afterwards."""
    health = check(table)
    if health.version is None:
        raise TableError(
            f"scores table {table.uri}: no version of its transaction log can be read; restore {LOG}/ from a "
            "backup, or score into a new --out"
        )
    if health.damaged_log:
        _set_aside_log(table, health.version)
    dropped = health.missing + sorted(health.unreadable)
    if dropped:
        record = {"dropped_files": dropped, "missing": health.missing, "unreadable": health.unreadable}
        table.change([], dropped, {REPAIR_KEY: json.dumps(record)})
    return check(table)


def _set_aside_log(table: ScoresTable, good: int) -> None:
    """Move the log entries and checkpoints after version ``good`` (and a checkpoint hint that points past it)
    into ``_stfpm/damaged/<time>/``: the table then ends at ``good``."""
    log, fs = table.location.join(LOG), table.location.filesystem
    aside = table.location.join(DAMAGED, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    fs.create_dir(aside.path, recursive=True)
    for entry in list_dir(log):
        prefix = entry.base_name.split(".", 1)[0]
        later = prefix.isdigit() and int(prefix) > good
        if later or (entry.base_name == "_last_checkpoint" and _hint_version(table, entry.path) > good):
            fs.move(entry.path, aside.join(entry.base_name).path)


def _hint_version(table: ScoresTable, path: str) -> int:
    try:
        with table.location.filesystem.open_input_stream(path) as handle:
            return int(json.loads(handle.read())["version"])
    except (OSError, ValueError, KeyError):  # an unreadable hint is no use to anyone: set it aside
        return 1 << 62


def small_files(table: ScoresTable) -> list[tuple[str, int]]:
    """The current version's ok-row files below half of :data:`ROWS_PER_FILE` rows, with their row counts:
    what a night of few new images adds, and what compaction merges. Error files have a merge of their own
    (:meth:`ScoresTable.retried_errors`) and stay apart, so a retry never rewrites a file of maps."""
    actions = pa.table(table.intact().get_add_actions(flatten=True)).select(["path", "num_records"]).to_pylist()
    return sorted(
        (row["path"], row["num_records"])
        for row in actions
        if not row["path"].endswith(ERRORS_SUFFIX) and row["num_records"] < ROWS_PER_FILE // 2
    )


def compact(table: ScoresTable, run_id: str) -> tuple[int, int]:
    """Merge the small ok-row files into files of up to :data:`ROWS_PER_FILE` rows, in one commit that changes
    no row (``data_change`` false; earlier versions keep their files until :func:`vacuum`). The caller holds
    the lease; the new files are named and recorded as run ``run_id``'s, so a compaction killed halfway is
    cleaned up like any run. Returns (files before, files after) of the merged set."""
    small = small_files(table)
    bins: list[list[str]] = [[]]
    rows = 0
    for name, count in small:
        if rows + count > ROWS_PER_FILE and bins[-1]:
            bins.append([])
            rows = 0
        bins[-1].append(name)
        rows += count
    bins = [names for names in bins if len(names) > 1]
    if not bins:
        return len(small), len(small)
    table.begin_run({"run_id": run_id, "mode": "compact"})
    written = []
    for i, names in enumerate(bins):
        merged = pa.concat_tables(
            conform(pq.read_table(table.location.join(name).path, filesystem=table.location.filesystem))
            for name in names
        )
        written += write_data_files(merged, table.location, f"{run_id}-{i:05d}")
    merged_names = [name for names in bins for name in names]
    table.change(
        [file.add_action(data_change=False) for file in written],
        merged_names,
        {COMPACT_KEY: json.dumps({"run_id": run_id, "merged": merged_names})},
        data_change=False,
    )
    table.end_run(run_id)
    return len(small), len(small) - len(merged_names) + len(written)


def vacuum(table: ScoresTable, retention_hours: int) -> list[str]:
    """Delete data files that no version of the last ``retention_hours`` needs, and checkpoint the log so that
    loading the table reads one file instead of every night's entry. Returns the files deleted.

    ``full``: files that no log entry names (those of commits a repair set aside, of runs that died before the
    run records existed) go too once older than the window; the caller holds the lease, so no run is writing.
    Folders starting with ``_`` (``_stfpm``, ``_reports``) are never touched."""
    delta = table.intact()
    deleted = delta.vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False, full=True)
    delta.create_checkpoint()
    return sorted(posixpath.basename(path) for path in deleted)
