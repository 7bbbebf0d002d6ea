"""``stfpm-ray table``: an operator's tools for a scores table that something went wrong with.

* ``check``: reads the log and every live data file's footer (:func:`stfpm_ray.store.health.check`); changes
  nothing, needs no lease.
* ``repair``: under the table's lease, sets aside log entries that cannot be read (the table falls back to
  the last version that loads), drops missing or unreadable data files in one commit, and deletes what runs
  killed before their commit left. The next ``nightly`` scores the images that lost their rows, once.
* ``compact``: under the lease, merges the small files that nights of few new images add into files of the
  usual size, in one commit that changes no row; ``nightly`` does it on its own past
  :data:`COMPACT_AFTER` small files.
* ``vacuum``: under the lease, deletes data files no version of the retention window needs and checkpoints
  the log, so a table that has seen years of nights still opens quickly.
"""

from __future__ import annotations

from stfpm_ray.errors import InputNotFoundError, OutputExistsError
from stfpm_ray.progress import Progress, log_progress
from stfpm_ray.store import health
from stfpm_ray.store.fs import is_dir
from stfpm_ray.store.publish import hold, new_run_id
from stfpm_ray.store.scores import LOG, ScoresTable

# Small files a table may hold before a nightly run compacts them: about a month of nights of few images.
COMPACT_AFTER = 32


def _table(uri: str) -> ScoresTable:
    table = ScoresTable(uri)
    if not is_dir(table.location.join(LOG)):
        raise InputNotFoundError(f"{uri} is not a scores table (no {LOG}/): write one with `stfpm-ray score`")
    return table


def check_table(uri: str, progress: Progress = log_progress) -> health.Health:
    """What is wrong with the table at ``uri``, one line per finding."""
    found = health.check(_table(uri))
    for line in found.lines():
        progress(line)
    return found


def repair_table(uri: str, progress: Progress = log_progress) -> health.Health:
    """Mend the table at ``uri`` (see the module doc); returns what a check finds afterwards."""
    table = _table(uri)
    with hold(table, new_run_id()):
        before = health.check(table)
        if before.damaged_log:
            progress(
                f"log entries {before.version + 1}..{before.newest} cannot be read: set aside in {health.DAMAGED}/"
            )
        for name in [*before.missing, *sorted(before.unreadable)]:
            progress(f"dropping {name} from the table: the next nightly scores its images again")
        after = health.repair(table)
        for run_id, count in table.recover().items():
            progress(f"run {run_id} died before its commit: deleted the {count} data files it left")
    for line in after.lines():
        progress(line)
    return after


def compact_table(uri: str, progress: Progress = log_progress) -> tuple[int, int]:
    """Merge the table's small data files; returns (small files before, after)."""
    table = _table(uri)
    run_id = new_run_id()
    with hold(table, run_id):
        table.recover()
        before, after = health.compact(table, run_id)
    progress(f"{uri}: {before} small data files compacted into {after} (table version {table.delta().version()})")
    return before, after


def compact_when_needed(uri: str, progress: Progress = log_progress) -> tuple[int, int] | None:
    """After a night: compact when more than :data:`COMPACT_AFTER` small files are live (None: not needed). A
    run that took the lease in the meantime wins; the next night compacts."""
    if len(health.small_files(ScoresTable(uri))) <= COMPACT_AFTER:
        return None
    try:
        return compact_table(uri, progress)
    except OutputExistsError as exc:
        progress(f"compaction left for the next night: {exc}")
        return None


def vacuum_table(uri: str, retention_hours: int, progress: Progress = log_progress) -> list[str]:
    """Delete the files no version of the last ``retention_hours`` needs, checkpoint the log; returns them."""
    table = _table(uri)
    with hold(table, new_run_id()):
        table.recover()
        deleted = health.vacuum(table, retention_hours)
    progress(
        f"{uri}: deleted {len(deleted)} data files that no version of the last {retention_hours} hours needs; "
        f"log checkpointed at version {table.delta().version()}"
    )
    return deleted
