"""Driver cost of a nightly ``--incremental`` run as the scores table grows.

For each archive size it builds a scores table of that many rows (files of ``ROWS_PER_FILE`` rows, as
scoring writes them; maps left out, the planning never reads them), then, in a fresh process, lists an
input folder of ``--new`` files (half of them already in the table) and plans the run exactly as
``stfpm-ray score --incremental`` does (:func:`stfpm_ray.data.plan.plan` with the table's filtered key
scan). It prints seconds and the driver's extra peak memory for the listing and planning, and that memory
per archived image (target <= 100 bytes).

    python benchmarks/incremental_scale.py                      # 1M and 10M rows, 1,000 new files
    python benchmarks/incremental_scale.py --rows 100000 --new 1000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from stfpm_ray.core.checkpoint import CheckpointMeta
from stfpm_ray.data.listing import list_images
from stfpm_ray.data.plan import plan
from stfpm_ray.progress import fixed_width_table
from stfpm_ray.store.scores import ROWS_PER_FILE, SCHEMA, DataFile, ScoresTable, write_data_files

MODEL_ID = "0123456789abcdef"
CATEGORY = "bench"


def _path(inbox: Path, i: int) -> str:
    return f"{inbox}/cam{i % 8}/img_{i:010d}.png"


def build_table(folder: Path, inbox: Path, rows: int) -> None:
    """A table of ``rows`` ok rows for ``inbox`` paths 0..rows-1, committed once."""
    folder.mkdir(parents=True)
    table = ScoresTable(str(folder))
    files: list[DataFile] = []
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        columns = {field.name: pa.nulls(n, field.type) for field in SCHEMA}
        columns.update(
            path=pa.array([_path(inbox, i) for i in range(start, start + n)], pa.string()),
            category=pa.array([CATEGORY] * n, pa.string()),
            model_id=pa.array([MODEL_ID] * n, pa.string()),
            status=pa.array(["ok"] * n, pa.string()),
            run_id=pa.array(["bench"] * n, pa.string()),
        )
        files += write_data_files(
            pa.table(columns, schema=SCHEMA), table.location, f"bench-{start // ROWS_PER_FILE:06d}"
        )
    table.commit(files, [], {"run_id": "bench", "rows": rows}, overwrite=False)


def make_inbox(inbox: Path, rows: int, new: int) -> None:
    """``new`` empty image files: the first half already scored (the table's last rows), the rest not."""
    for i in range(rows - new // 2, rows - new // 2 + new):
        path = Path(_path(inbox, i))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def measure(folder: str, inbox: str) -> dict:
    """In this (fresh) process: list and plan, returning seconds and the extra peak memory."""
    meta = CheckpointMeta(
        category=CATEGORY,
        backbone="b",
        layers=[1],
        image_size=256,
        teacher_source="t",
        teacher_sha256="0",
        threshold=1.0,
        normalization={},
        model_id=MODEL_ID,
    )
    table = ScoresTable(folder)
    table.dataset()  # open the table first: its log is read by every run, whatever it plans
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    listing = list_images([inbox])
    planned = plan(listing, {CATEGORY: meta}, {}, CATEGORY, table.already_scored, 32)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": seconds,
        "extra_peak_bytes": max(0, peak - before),
        "listed": listing.files.num_rows,
        "to_score": planned.images,
        "skipped": planned.counts[CATEGORY].skipped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000], help="archive sizes")
    parser.add_argument("--new", type=int, default=1000, help="files in the input folder (half already scored)")
    parser.add_argument("--measure", nargs=2, metavar=("TABLE", "INBOX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    results = []
    for rows in args.rows:
        work = Path(tempfile.mkdtemp(prefix="incremental-scale-"))
        try:
            started = time.perf_counter()
            build_table(work / "scores", work / "inbox", rows)
            make_inbox(work / "inbox", rows, args.new)
            print(f"built a table of {rows:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
            child = [sys.executable, __file__, "--measure", str(work / "scores"), str(work / "inbox")]
            result = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
            assert (result["to_score"], result["skipped"]) == (args.new - args.new // 2, args.new // 2), result
            results.append(
                (
                    f"{rows:,}",
                    result["listed"],
                    result["to_score"],
                    f"{result['seconds']:.2f}",
                    f"{result['extra_peak_bytes'] / 1e6:.1f}",
                    f"{result['extra_peak_bytes'] / rows:.1f}",
                )
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(
        fixed_width_table(("archived rows", "listed", "to score", "plan s", "extra peak MB", "bytes/archived"), results)
    )
    print("target: <= 100 bytes of driver memory per archived image")


if __name__ == "__main__":
    main()
