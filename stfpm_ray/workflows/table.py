"""``stfpm-ray table``: an operator's tools for a scores table that something went wrong with.

* ``check``: reads the log and every live data file's footer (:func:`stfpm_ray.store.health.check`); changes
  nothing, needs no lease.
* ``repair``: under the table's lease, sets aside log entries that cannot be read (the table falls back to
  the last version that loads), drops missing or unreadable data files in one commit, and deletes what runs
  killed before their commit left. The next ``nightly`` scores the images that lost their rows, once.
* ``vacuum``: under the lease, deletes data files no version of the retention window needs and checkpoints
  the log, so a table that has seen years of nights still opens quickly.
"""

from __future__ import annotations

from stfpm_ray.errors import InputNotFoundError
from stfpm_ray.progress import Progress, log_progress
from stfpm_ray.store import health
from stfpm_ray.store.fs import is_dir
from stfpm_ray.store.publish import hold, new_run_id
from stfpm_ray.store.scores import LOG, ScoresTable


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
