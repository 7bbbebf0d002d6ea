"""A year of nights on one scores table, with kills and lost files: does it stay exact, and does it slow down?

Each night a few new images arrive in the archive and a night's run scores what has no ok row yet, through
the store exactly as ``nightly`` does (lease, recovery of dead runs, incremental plan, one commit); the
scoring itself is replaced by synthetic rows (a random score and a real 128 px encoded map), so a year runs
in minutes without Ray. At random:

* a run is killed after its write tasks (what ``kill -9`` leaves: its record, its data files, its lease with
  a dead pid); the next night recovers;
* a live data file is deleted (a lifecycle rule); the next night refuses with exit status 5 and the
  operator's ``stfpm-ray table repair`` drops it, so the night after scores its images again.

Two tables get the same nights and events: one kept as ``nightly`` keeps it (compaction past 32 small files)
plus ``table vacuum`` every 30 nights, one never maintained. Printed at the end: rows lost and doubled (both
must be 0), live files, and the time to open and read each table as ``evaluate`` does (median of 3) on the
last night against the first.

    python benchmarks/table_soak.py --nights 365 --images-per-night 5 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
from deltalake import DeltaTable

from stfpm_ray.errors import TableError
from stfpm_ray.evaluate.evaluation import open_scores, read_index
from stfpm_ray.progress import fixed_width_table
from stfpm_ray.store.lease import Lease
from stfpm_ray.store.mapcodec import encode_map
from stfpm_ray.store.publish import new_run_id, table_run
from stfpm_ray.store.scores import SCHEMA, ScoresTable, write_data_files
from stfpm_ray.workflows.table import compact_when_needed, repair_table, vacuum_table

MODEL = "0123456789abcdef"
VACUUM_EVERY = 30
quiet = lambda message: None  # noqa: E731


def scored(paths: list[str], run_id: str, rng: np.random.Generator) -> pa.Table:
    """Rows as a scoring run writes them, with a random score and a real encoded 128 px map."""
    rows = []
    for path in paths:
        anomaly_map, scale = encode_map(rng.random((128, 128), dtype=np.float32))
        score = float(rng.random())
        rows.append(
            dict(path=path, category="soak", score=score, score_norm=score / 0.5, is_anomalous=score > 0.5, label=-1)
            | dict(anomaly_map=anomaly_map, map_scale=scale, model_id=MODEL, run_id=run_id, status="ok")
            | dict(scored_at=datetime.now(timezone.utc))
        )
    return pa.Table.from_pylist(rows, SCHEMA)


def night(out: Path, archive: list[str], rng: np.random.Generator, killed: bool = False) -> None:
    """One nightly run into ``out``: plan what has no ok row, write it, commit (or die before the commit)."""
    run_id = new_run_id()
    with table_run(str(out), run_id, "incremental") as run:
        keys = pa.table({"path": archive, "model_id": [MODEL] * len(archive)})
        done = run.already_scored(keys) if run.already_scored else pa.array([False] * len(archive))
        todo = [path for path, ok in zip(archive, done.to_pylist()) if not ok]
        if not todo:
            return
        files = write_data_files(scored(todo, run_id, rng), run.table.location, f"{run_id}-00000")
        if killed:
            raise _Killed
        run.publish(files, pa.chunked_array([todo]), {"run_id": run_id}, {})


class _Killed(BaseException):
    """Stands for SIGKILL after the write tasks: nothing after it runs."""


def killed_night(out: Path, archive: list[str], rng: np.random.Generator) -> None:
    """A night killed after its writes, leaving what ``kill -9`` leaves: its record, its data files and its
    lease, whose pid is then a dead one (the cleanup hooks are switched off while it runs)."""
    saved = ScoresTable.discard, ScoresTable.end_run, Lease.release
    ScoresTable.discard = ScoresTable.end_run = lambda self, run_id: None  # type: ignore[method-assign]
    Lease.release = lambda self: None  # type: ignore[method-assign]
    try:
        night(out, archive, rng, killed=True)
    except _Killed:
        pass
    finally:
        ScoresTable.discard, ScoresTable.end_run, Lease.release = saved  # type: ignore[method-assign]
        lease = out / "_stfpm" / "lease.json"
        process = subprocess.Popen(["true"])
        process.wait()
        lease.write_text(json.dumps({**json.loads(lease.read_text()), "pid": process.pid}))


def read_seconds(out: Path, repeat: int = 3) -> float:
    """Median time to open the table and read its index, as ``evaluate`` does first."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        dataset, _ = open_scores(out)
        read_index(dataset)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--images-per-night", type=int, default=5)
    parser.add_argument("--kill-rate", type=float, default=0.05)
    parser.add_argument("--loss-rate", type=float, default=0.02, help="chance per night that a data file is deleted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=1200, help="stop early (and say so) past this")
    args = parser.parse_args()
    events, rng = random.Random(args.seed), np.random.default_rng(args.seed)
    root = Path(tempfile.mkdtemp(prefix="stfpm-soak-"))
    tables = {"maintained": root / "maintained", "never maintained": root / "plain"}
    archive: list[str] = []
    first: dict[str, float] = {}
    counts = {"kills": 0, "files lost": 0, "repairs": 0}
    started = time.time()
    for n in range(1, args.nights + 1):
        archive += [f"/archive/night-{n:04d}/img-{i:03d}.png" for i in range(args.images_per_night)]
        kill, lose = events.random() < args.kill_rate, events.random() < args.loss_rate
        counts["kills"] += kill
        for name, out in tables.items():
            run_night(out, archive, rng, kill, maintained=name == "maintained", n=n, counts=counts)
            if lose and n > 1:
                live = sorted(os.path.basename(u) for u in DeltaTable(str(out)).file_uris())
                (out / live[random.Random(args.seed * 100_003 + n).randrange(len(live))]).unlink()
                counts["files lost"] += name == "maintained"  # one event, both tables
            if n == 1:
                first[name] = read_seconds(out)
        if time.time() - started > args.max_seconds:
            print(f"stopped after night {n} of {args.nights}: --max-seconds {args.max_seconds} reached")
            break
    report(tables, archive, first, counts, n)


def run_night(out: Path, archive: list[str], rng, kill: bool, maintained: bool, n: int, counts: dict) -> None:
    """A night as an operator's cron job runs it: the nightly; after an exit status 5, `table repair`."""
    try:
        if kill:
            killed_night(out, archive, rng)
            return
        night(out, archive, rng)
    except TableError:
        repair_table(str(out), quiet)
        counts["repairs"] += 1
        return  # the cron job failed tonight; tomorrow's night scores what the repair dropped
    if maintained:
        compact_when_needed(str(out), quiet)
        if n % VACUUM_EVERY == 0:
            vacuum_table(str(out), 0, quiet)


def report(tables: dict[str, Path], archive: list[str], first: dict[str, float], counts: dict, nights: int) -> None:
    rows = []
    for name, out in tables.items():
        try:
            night(out, archive, np.random.default_rng(1))  # the morning after: catch up
        except TableError:
            repair_table(str(out), quiet)
            night(out, archive, np.random.default_rng(1))
        frame = DeltaTable(str(out)).to_pandas(columns=["path"])
        lost = len(set(archive) - set(frame.path))
        doubled = int(frame.path.duplicated().sum())
        live = len(DeltaTable(str(out)).file_uris())
        on_disk = len(list(out.glob("*.parquet")))
        last = read_seconds(out)
        rows.append(
            (name, lost, doubled, live, on_disk, f"{first[name]:.3f}", f"{last:.3f}", f"{last / first[name]:.1f}x")
        )
    print(f"{nights} nights, {len(archive)} images; " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    headers = (
        "table",
        "rows lost",
        "rows doubled",
        "live files",
        "parquet files",
        "read s night 1",
        "read s last",
        "ratio",
    )
    print(fixed_width_table(headers, rows))


if __name__ == "__main__":
    main()
