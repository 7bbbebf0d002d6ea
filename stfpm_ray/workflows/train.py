"""``stfpm-ray train``: one student per category, categories in parallel, checkpoints in ``CKPT_DIR/<category>``.

The steps:

1. **Check the teacher** on the driver (:func:`stfpm_ray.core.teacher.load_teacher`): missing or wrong
   weights fail here once, not in every worker.
2. **Claim the output folder** (:func:`stfpm_ray.store.checkpoint_folder.claim_training_folder`): a fresh
   run, ``--resume`` of the run recorded there (same settings), or ``--overwrite``.
3. **Keep finished categories**: with ``--resume``, a category whose checkpoint is complete is not trained
   again.
4. **Train on Ray** (:func:`stfpm_ray.ray.trainer.train_on_ray`): one ``TorchTrainer`` per category running
   the core's fit recipe; each checkpoint installed whole.
5. **Summarise**: one row per category, trained, complete or failed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from stfpm_ray.core.checkpoint import META_FILE
from stfpm_ray.core.fit import TrainConfig
from stfpm_ray.core.fit_report import CategoryResult, format_summary
from stfpm_ray.core.teacher import load_teacher
from stfpm_ray.progress import Progress, log_progress
from stfpm_ray.ray.resources import TrainResources
from stfpm_ray.ray.trainer import TrainJob, train_on_ray
from stfpm_ray.store.checkpoint_folder import claim_training_folder
from stfpm_ray.store.fs import is_uri


def train_categories(
    root: str | Path,
    categories: list[str],
    out_dir: str | Path,
    config: TrainConfig,
    resources: TrainResources = TrainResources(),
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress = log_progress,
    address: str | None = None,
) -> list[CategoryResult]:
    """Fit one student per category with Ray Train, concurrently; checkpoints go to ``out_dir/<category>``.

    ``root`` is a local folder or a URI (``s3://``, ``gs://``) in the MVTec AD layout. Never raises for a
    category that fails (its result carries the error); raises a :class:`~stfpm_ray.errors.StfpmError` for
    bad settings or an output folder this run may not write into.
    """
    data = str(root) if is_uri(str(root)) else str(Path(root).resolve())
    out_path = Path(out_dir).resolve()
    storage_path = resources.storage_path
    if storage_path is not None and not is_uri(storage_path):
        storage_path = str(Path(storage_path).resolve())  # Ray changes the working folder of trials
    load_teacher(config.backbone, config.layers, config.weights)
    identity = json.loads(
        json.dumps({"root": data, "config": asdict(config), "workers_per_category": resources.workers_per_category})
    )
    run_id, storage = claim_training_folder(
        out_path, identity, storage_path, resume, overwrite, is_checkpoint=lambda folder: (folder / META_FILE).is_file()
    )

    results = {c: r for c in categories if (r := CategoryResult.complete(c, str(out_path / c))) is not None}
    for category in results:
        progress(f"[{category}] already complete in {out_path / category}, skipped")
    pending = [c for c in categories if c not in results]
    if pending:
        job = TrainJob(root=data, config=config, resources=resources, storage_path=storage, run_id=run_id)
        results.update(train_on_ray(pending, job, out_path, progress, address))
    ordered = [results[c] for c in categories]
    progress(format_summary(ordered))
    return ordered
