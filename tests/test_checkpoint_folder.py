"""The training output folder (stfpm_ray.store.checkpoint_folder): which run may write it, and checkpoints
installed whole with modes other users can read."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from stfpm_ray.core.checkpoint import META_FILE, read_meta, save_checkpoint
from stfpm_ray.core.fit import TrainConfig, fit_category
from stfpm_ray.data.mvtec import discover_categories
from stfpm_ray.store.checkpoint_folder import RUN_FILE, claim_training_folder, install_folder

# The synthetic "tiles" defects are too small to separate at 64 px; "grain" and "weave" are not.
PAIR = ["grain", "weave"]
CONFIG = TrainConfig(weights="offline", image_size=64, batch_size=8, epochs=20, seed=3)
TINY = ["--weights", "offline", "--image-size", "64", "--batch-size", "8", "--epochs", "1"]


def _claim(out: Path, identity: dict, storage: str | None, resume: bool, overwrite: bool) -> tuple[str, str]:
    return claim_training_folder(
        out, identity, storage, resume, overwrite, lambda folder: (folder / META_FILE).is_file()
    )


def test_overwrite_empties_the_run_folder_and_resume_keeps_its_run_id(tmp_path):
    out = tmp_path / "ckpt"
    identity = {"config": {"epochs": 1}}
    run_id, storage = _claim(out, identity, None, resume=False, overwrite=False)
    assert storage == str(out / "_ray") and json.loads((out / RUN_FILE).read_text())["run_id"] == run_id
    (out / "grain").mkdir()
    assert _claim(out, identity, None, resume=True, overwrite=False) == (run_id, storage)
    with pytest.raises(ValueError, match="its Ray Train state is in"):
        _claim(out, identity, str(tmp_path / "elsewhere"), resume=True, overwrite=False)
    new_id, _ = _claim(out, identity, None, resume=False, overwrite=True)
    assert new_id != run_id and sorted(p.name for p in out.iterdir()) == [RUN_FILE]


def test_installed_checkpoint_folders_are_readable_by_others(synth_root, tmp_path):
    """Installed folders take their mode from the umask (0755 under 022), as shared cluster storage needs."""
    category = discover_categories(synth_root)[0]
    model, meta, _ = fit_category(synth_root, category, TrainConfig(weights="offline", image_size=64, epochs=1))
    reported = tmp_path / "reported"
    save_checkpoint(reported, model.student, meta, model.memory_bank)
    previous = os.umask(0o022)
    try:
        install_folder(tmp_path / "installed", lambda staging: shutil.copytree(reported, staging, dirs_exist_ok=True))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "installed").stat().st_mode) == 0o755
    assert read_meta(tmp_path / "installed").model_id == meta.model_id
