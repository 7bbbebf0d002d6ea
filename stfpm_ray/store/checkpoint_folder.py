"""The training output folder ``CKPT_DIR``: which run may write it, and whole checkpoints installed into it.

``CKPT_DIR/_run.json`` records the run's identity (data root, training config, workers), its id and where
Ray Train keeps its state; the id names the Ray Train runs, so ``--resume`` finds the interrupted runs' state
and a fresh run never picks up another run's state. Two runs' files never mix: a folder that holds a run is
refused unless the new run resumes it (same identity) or overwrites it.

A category's checkpoint appears in ``CKPT_DIR/<category>/`` whole or not at all: it is filled in a hidden
sibling folder, checked, then renamed into place.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stfpm_ray.errors import OutputExistsError, UserError
from stfpm_ray.store.fs import write_text_atomic

RUN_FILE = "_run.json"
DEFAULT_STORAGE_DIR = "_ray"


def _refuse_changed(out_dir: Path, identity: dict[str, Any], record: dict[str, Any], storage_path: str | None) -> None:
    """A resumed run must ask for what the interrupted one was trained with, and find its state."""
    changed = sorted(
        k for k in identity.keys() | record["identity"].keys() if identity.get(k) != record["identity"].get(k)
    )
    if changed:
        was = ", ".join(f"{k}={record['identity'].get(k)!r}" for k in changed)
        now = ", ".join(f"{k}={identity.get(k)!r}" for k in changed)
        raise UserError(
            f"cannot --resume {out_dir}: it was trained with {was}, this run asks for {now}; "
            "use the same settings, or --overwrite"
        )
    if storage_path is not None and storage_path != record["storage_path"]:
        raise UserError(
            f"cannot --resume {out_dir}: its Ray Train state is in {record['storage_path']}, not {storage_path}"
        )


def claim_training_folder(
    out_dir: Path,
    identity: dict[str, Any],
    storage_path: str | None,
    resume: bool,
    overwrite: bool,
    is_checkpoint: Callable[[Path], bool],
) -> tuple[str, str]:
    """Decide whether this run may write into ``out_dir``; returns (run id, Ray Train storage path).

    ``resume`` continues the run recorded there (same identity, same run id); ``overwrite`` empties the
    folder, which must hold a run's output, and starts a new run id. ``is_checkpoint`` tells which entries
    are finished categories, for the refusal's message.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output {out_dir} exists and is not a folder")
    record_path = out_dir / RUN_FILE
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and not record_path.is_file():
        raise OutputExistsError(
            f"output folder {out_dir} is not empty and holds no {RUN_FILE}, so it was not written by "
            "`stfpm-ray train`; choose an empty or new folder"
        )
    if entries and resume:
        record = json.loads(record_path.read_text())
        _refuse_changed(out_dir, identity, record, storage_path)
        return record["run_id"], record["storage_path"]
    if entries and not overwrite:
        done = [name for name in entries if is_checkpoint(out_dir / name)]
        raise OutputExistsError(
            f"output folder {out_dir} already holds a training run ({len(done)} finished categories); "
            "pass --resume to finish it or --overwrite to replace it"
        )
    for name in entries:  # overwrite: the folder is known to be a previous run's output
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    storage = storage_path or str(out_dir / DEFAULT_STORAGE_DIR)
    record = {"run_id": run_id, "storage_path": storage, "identity": identity}
    write_text_atomic(record_path, json.dumps(record, indent=2))
    return run_id, storage


def install_folder(target: Path, fill: Callable[[Path], object]) -> None:
    """Make ``target`` the folder that ``fill`` writes, whole or not at all (fill a sibling, then rename).

    ``fill`` may raise to refuse what it found; ``target`` is then left as it was. The staging folder is made
    with ``mkdir`` (modes from the umask, 0755 under the usual 022), not ``mkdtemp`` (always 0700), because it
    becomes the installed folder that other users of a shared cluster filesystem must read.
    """
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        fill(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
