"""A scoring run's hold on its table, from the lease to the one commit that publishes it.

:func:`table_run` is the context a run works in: it takes the table's lease (one writer per table,
:mod:`stfpm_ray.store.lease`), deletes what runs killed before their commit left, checks that the output may
be written in the run's mode, records the run, and on any failure deletes the run's own uncommitted files. Inside it,
:meth:`TableRun.publish` is the only way rows enter the table: it checks the run's files (exactly one row
per planned image), retires the error rows this run retried, records the manifest and makes one Delta
commit, so readers see the previous version or the whole run, never a part of it or a doubled row.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from stfpm_ray.errors import TableError, UserError
from stfpm_ray.store.fs import is_dir, remove_empty
from stfpm_ray.store.lease import STATE, Holder, Lease
from stfpm_ray.store.scores import DataFile, ScoresTable, counts_by_category, duplicated_paths

MODES = ("plain", "incremental", "overwrite")


def new_run_id() -> str:
    """A run's id: sortable by start time (UTC), unique by a random suffix; it prefixes the run's files."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class Published:
    """What a commit published: the table version, rows and files, and per category ok and error rows."""

    version: int
    rows: int
    files: int
    counts: dict[str, dict[str, int]]


class TableRun:
    """One run's exclusive hold on a scores table (made by :func:`table_run`)."""

    def __init__(
        self, table: ScoresTable, lease: Lease, run_id: str, mode: str, exists: bool, recovered: dict[str, int]
    ) -> None:
        self.table, self.lease, self.run_id, self.mode = table, lease, run_id, mode
        self.exists = exists
        # {run_id: data files deleted} of the runs killed before their commit that this run cleaned up after
        self.recovered = recovered
        self.committing = False

    @property
    def took_over(self) -> Holder | None:
        """The dead run whose lease this run took over, if any."""
        return self.lease.took_over

    @property
    def already_scored(self) -> Callable[[pa.Table], pa.Array] | None:
        """For an incremental run into an existing table: which ``(path, model_id)`` have an ok row."""
        return self.table.already_scored if self.mode == "incremental" and self.exists else None

    def publish(
        self, files: list[DataFile], expected: pa.ChunkedArray, manifest: dict[str, Any], skipped: dict[str, int]
    ) -> Published:
        """Commit the run's ``files`` as one table version, refusing unless ``expected`` (every planned path)
        has exactly one row. ``manifest`` is what the caller records of the run; the files, rows, counts
        (with ``skipped`` images per category), retired error files and the scoring processes' records are
        added here."""
        index = self.table.read_index(files)
        check_staged(index, expected)
        counts = counts_by_category(index)
        removed, kept = ([], [])
        if self.mode == "incremental":
            removed, kept = self.table.retried_errors(index["path"], self.run_id)
        record = {
            **manifest,
            "rows": index.num_rows,
            "files": [{"name": f.name, "rows": f.rows} for f in files],
            "counts": {
                name: {"ok": 0, "error": 0, **counts.get(name, {}), "skipped": skipped.get(name, 0)}
                for name in sorted(counts.keys() | skipped.keys())
            },
            "replaced_error_files": removed,
            "workers": self.table.worker_records(self.run_id),
        }
        self.lease.check()
        # From here on the log entry may exist, so these files may be live: they must never be discarded.
        self.committing = True
        version = self.table.commit(files + kept, removed, record, overwrite=self.mode == "overwrite")
        return Published(version, index.num_rows, len(files), counts)


@contextmanager
def table_run(uri: str, run_id: str, mode: str) -> Iterator[TableRun]:
    """Hold the table at ``uri`` for one run in ``mode`` (``plain``, ``incremental`` or ``overwrite``).

    Under the lease, first deletes what runs killed before their commit left (:meth:`ScoresTable.recover`),
    then refuses an output the mode may not write (:meth:`ScoresTable.check_mode`), then records this run
    before it writes anything. A failure inside deletes the run's uncommitted files, unless its commit had
    begun. A run that commits nothing leaves no folder it created behind: a refused run leaves no trace.
    """
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    table = ScoresTable(uri)
    created = [place for place in (table.location, table.location.join(STATE)) if not is_dir(place)]
    run: TableRun | None = None
    try:
        with hold(table, run_id) as lease:
            recovered = table.recover()
            run = TableRun(table, lease, run_id, mode, table.check_mode(mode), recovered)
            table.begin_run({"run_id": run_id, "mode": mode, **lease.describe_holder()})
            # The record goes once nothing of the run can be left half-done: after it returned, or after its
            # failure removed its files. A commit that failed may have landed: the next run's recover decides.
            settled = False
            try:
                yield run
                settled = True
            except BaseException:
                settled = not run.committing and table.discard(run_id)
                raise
            finally:
                if settled:
                    table.end_run(run_id)
    finally:
        if run is None or not run.committing:
            remove_empty(reversed(created))


@contextmanager
def hold(table: ScoresTable, run_id: str) -> Iterator[Lease]:
    """The table's lease for ``run_id`` (a scoring run, or table maintenance); a folder this user may not
    write is a :class:`TableError`, not a traceback."""
    lease = Lease(table.location, run_id)
    try:
        lease.acquire()
    except PermissionError as exc:
        raise TableError(
            f"scores table {table.uri}: no permission to write ({exc.strerror or exc}); a read-only mount or "
            "expired credentials? Make it writable for this user, or score into another --out"
        ) from None
    try:
        yield lease
    finally:
        lease.release()


def check_staged(index: pa.Table, expected: pa.ChunkedArray) -> None:
    """Refuse to commit unless every expected path has exactly one row."""
    duplicates = duplicated_paths(index)
    missing = expected.filter(pc.invert(pc.is_in(expected, value_set=index["path"].combine_chunks())))
    if duplicates or len(missing) or index.num_rows != len(expected):
        raise RuntimeError(
            f"the run wrote {index.num_rows} rows for {len(expected)} images "
            f"({len(duplicates)} paths twice, {len(missing)} missing, "
            f"e.g. {(duplicates or missing.to_pylist())[:2]}); nothing was committed"
        )
