"""One writer per scores table: an exclusive lease file, ``OUT_DIR/_stfpm/lease.json``.

Two scoring runs into one table would each plan the same new images and each append them, so the lease is
taken before anything is listed or planned, and checked again right before the commit.

* **Taking it** is an exclusive create: the lease is written whole under a private name and hard-linked
  into place, which fails if a lease exists (atomic on local and shared POSIX filesystems, NFS included).
  A second run refuses at once and names the holder (run id, user, host, pid, age of the heartbeat).
* **Keeping it**: a daemon thread rewrites the heartbeat every :data:`HEARTBEAT_S` seconds, after checking
  the file still names this run.
* **Taking over**: a lease is stale when its holder ran on this host and that pid is gone, or when its
  heartbeat is older than :data:`STALE_AFTER_S` (a holder on another host that died). The stale file is
  renamed aside first; rename is atomic, so of two runs taking over at once exactly one wins and the other
  refuses. A holder that was only paused past the limit finds a foreign run id at its next heartbeat or at
  its commit check and stops without committing.
* **Object stores** (``s3://``, ``gs://``) have no exclusive create through pyarrow, so there the lease is
  written, read back and compared (advisory): the scheduler must not start two runs into one table at the
  same moment, which cron and Airflow guarantee for one task with ``max_active_runs=1``.
"""

from __future__ import annotations

import getpass
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from stfpm_ray.errors import OutputExistsError, StfpmError
from stfpm_ray.store.fs import Location, list_dir, read_text, write_text_atomic

# The folder of stfpm-ray's own state beside a table's data: the lease, records of running runs.
STATE = "_stfpm"
LEASE_FILE = f"{STATE}/lease.json"
HEARTBEAT_S = 30.0
# Ten missed heartbeats: long enough for a stalled NFS server, short enough for the next night's run.
STALE_AFTER_S = 600.0
# Leases set aside by takeovers are kept as evidence of what happened; the most recent ones are enough.
KEEP_SET_ASIDE = 10


class LeaseLostError(StfpmError, RuntimeError):
    """Another run took this run's lease (this one looked dead); it must not commit."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as written in the lease file."""

    run_id: str
    user: str
    host: str
    pid: int
    started_at: str
    heartbeat: float

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return (
            f"run {self.run_id} of {self.user} on {self.host} (pid {self.pid}, started {self.started_at}, "
            f"last heartbeat {age:.0f} s ago)"
        )

    def is_stale(self, now: float) -> bool:
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return True
        return now - self.heartbeat > STALE_AFTER_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class Lease:
    """The exclusive right of one run to write one table; use as a context manager."""

    def __init__(self, table: Location, run_id: str) -> None:
        self.location = table.join(LEASE_FILE)
        self.holder = Holder(
            run_id,
            getpass.getuser(),
            socket.gethostname(),
            os.getpid(),
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
            time.time(),
        )
        self._stop = threading.Event()
        self._lost = False
        self._thread: threading.Thread | None = None
        self.took_over: Holder | None = None

    @property
    def _local(self) -> bool:
        return isinstance(self.location.filesystem, pafs.LocalFileSystem)

    def _text(self, heartbeat: float | None = None) -> str:
        fields: dict[str, Any] = asdict(self.holder)
        if heartbeat is not None:
            fields["heartbeat"] = heartbeat
        return json.dumps(fields, indent=2)

    def describe_holder(self) -> dict[str, Any]:
        """This run as the lease names it (user, host, pid, start), without the heartbeat."""
        fields = asdict(self.holder)
        del fields["heartbeat"], fields["run_id"]
        return fields

    def read(self) -> Holder | None:
        """The current holder, or None when there is no lease file (or it was just removed)."""
        try:
            return Holder(**json.loads(read_text(self.location)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # a half-written file of a run killed while creating it
            return Holder("unknown", "unknown", "unknown", -1, "unknown", 0.0)

    def _create(self) -> bool:
        """Exclusive create; False when a lease file exists."""
        self.location.filesystem.create_dir(posixpath.dirname(self.location.path), recursive=True)
        if not self._local:
            if self.read() is not None:
                return False
            write_text_atomic(self.location, self._text())
            return self._is_ours(self.read())
        # Written whole under a private name, then hard-linked into place: link() fails when the lease exists
        # (atomically, NFS included), and a reader never sees an empty file that it would take for stale.
        draft = f"{self.location.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(draft, "w") as handle:
            handle.write(self._text())
        try:
            os.link(draft, self.location.path)
        except FileExistsError:
            return False
        finally:
            os.unlink(draft)
        return True

    def acquire(self) -> Lease:
        """Take the lease, taking over a stale one; refuse with the holder's name when it is live."""
        for _ in range(2):
            if self._create():
                self._start_heartbeat()
                if self.took_over is not None:
                    self._prune_set_aside()
                return self
            holder = self.read()
            if holder is None:
                continue  # released between our create and read: try again
            if not holder.is_stale(time.time()):
                raise OutputExistsError(
                    f"{self.location.prefix}{posixpath.dirname(posixpath.dirname(self.location.path))} is being "
                    f"written by {holder.describe()}; wait for it to finish (a lease without heartbeat for "
                    f"{STALE_AFTER_S:.0f} s is taken over)"
                )
            self._set_aside(holder)
        raise OutputExistsError(f"another run took the lease {self.location.name} at the same moment; try again")

    def _set_aside(self, holder: Holder) -> None:
        # named by the time of the takeover, so that names sort by age on object stores too
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = posixpath.join(
            posixpath.dirname(self.location.path), f"lease-stale-{stamp}-{uuid.uuid4().hex[:8]}.json"
        )
        try:
            self.location.filesystem.move(self.location.path, aside)
        except OSError:  # another run set it aside first; the create that follows decides
            return
        self.took_over = holder

    def _prune_set_aside(self) -> None:
        """Delete all but the :data:`KEEP_SET_ASIDE` most recent set-aside leases (a table taken over every
        night would otherwise collect one file per night for ever)."""
        folder = self.location.at(posixpath.dirname(self.location.path))
        names = [entry.path for entry in list_dir(folder) if entry.base_name.startswith("lease-stale-")]
        for path in names[:-KEEP_SET_ASIDE]:
            try:
                self.location.filesystem.delete_file(path)
            except OSError:  # pruned by a run that took over at the same time
                pass

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="stfpm-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._is_ours(self.read()):
                self._lost = True
                return
            write_text_atomic(self.location, self._text(time.time()))

    def _is_ours(self, holder: Holder | None) -> bool:
        mine = self.holder
        return holder is not None and (holder.run_id, holder.host, holder.pid) == (mine.run_id, mine.host, mine.pid)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this run still holds the lease (called before committing)."""
        holder = self.read()
        if self._lost or not self._is_ours(holder):
            who = "nobody" if holder is None else holder.describe()
            raise LeaseLostError(f"lost the lease on this table to {who}; nothing was committed")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._is_ours(self.read()):
            self.location.filesystem.delete_file(self.location.path)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
