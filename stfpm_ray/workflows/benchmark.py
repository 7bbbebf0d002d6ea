"""``stfpm-ray benchmark``: train every category, score every test split, evaluate, print the table.

This is the whole product in one command, as users run it to benchmark all 15 MVTec AD categories at once.
The steps:

1. **Data**: ``--data``, or without it the embedded demo: a synthetic MVTec-layout dataset generated into
   ``OUT/data`` and trained with a small preset (128 px, 50 epochs) so that a fresh machine finishes in
   minutes.
2. **Train** every category (:mod:`stfpm_ray.workflows.train`) into ``OUT/checkpoints/<category>/``.
3. **Score** the test splits of the categories that trained (:mod:`stfpm_ray.workflows.score`) into the
   scores table ``OUT/scores/`` (Delta Lake).
4. **Evaluate** (:mod:`stfpm_ray.evaluate.evaluation`) into ``OUT/report/`` (metrics and HTML), and record
   the stage timings and the metrics in ``OUT/benchmark.json``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from stfpm_ray.core.fit import TrainConfig
from stfpm_ray.data.mvtec import resolve_categories
from stfpm_ray.data.synth import generate_dataset
from stfpm_ray.errors import OutputExistsError
from stfpm_ray.evaluate.evaluation import evaluate_scores
from stfpm_ray.evaluate.report import metrics_json
from stfpm_ray.progress import Progress, log_progress
from stfpm_ray.ray.pipeline import ScoringOptions
from stfpm_ray.ray.resources import TrainResources
from stfpm_ray.store.fs import join, write_text_atomic
from stfpm_ray.workflows.score import score_images
from stfpm_ray.workflows.train import train_categories

# The embedded demo: small enough for two CPU cores, large enough for meaningful AUROC. 50 epochs of the
# default (reverse) student cost about what 20 of the mirror student did (docs/results-history.md).
DEMO_DATA = {"categories": 3, "size": 128, "n_train": 40, "n_test": 20, "seed": 0}
DEMO_TRAINING = {"image_size": 128, "epochs": 50}


def _data_root(data: str | Path | None, out: Path, progress: Progress) -> str | Path:
    """``data``, or without it the synthetic demo dataset in ``out/data`` (generated once)."""
    if data is not None:
        return data
    demo = out / "data"
    if not (demo.exists() and any(demo.iterdir())):
        progress(f"no --data given: generating the synthetic demo dataset in {demo}")
        generate_dataset(demo, progress=progress, **DEMO_DATA)
    return demo


def run_benchmark(
    data: str | Path | None,
    out: str | Path,
    config: TrainConfig,
    resources: TrainResources = TrainResources(),
    options: ScoringOptions = ScoringOptions(),
    categories: str = "all",
    overwrite: bool = False,
    progress: Progress = log_progress,
    resume: bool = False,
) -> dict:
    """Train, score and evaluate; return ``{"stages": {...seconds}, "metrics": {...}, "failed": [...]}``.

    ``resume`` continues a benchmark in ``out``: training resumes (see ``train_categories``), scoring and
    evaluation run again on what it trained.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise OutputExistsError(
            f"{out} is not empty; pass --resume to continue its benchmark, --overwrite to replace it, or another --out"
        )
    stages: dict[str, float] = {}
    data = _data_root(data, out, progress)
    names = resolve_categories(data, categories)

    started = time.perf_counter()
    results = train_categories(
        data, names, out / "checkpoints", config, resources, resume=resume, overwrite=overwrite, progress=progress
    )
    stages["train_s"] = time.perf_counter() - started
    trained = [r.category for r in results if r.ok]
    failed = [r.category for r in results if not r.ok]
    if not trained:
        raise RuntimeError(f"no category trained successfully: {failed}")

    started = time.perf_counter()
    summary = score_images(
        out / "checkpoints",
        [join(data, name, "test") for name in trained],
        out / "scores",
        options,
        overwrite=True,
        progress=progress,
    )
    stages["score_s"] = time.perf_counter() - started
    stages["score_images_per_s"] = summary.rows_written / stages["score_s"] if stages["score_s"] else 0.0

    started = time.perf_counter()
    metrics = evaluate_scores(out / "scores", out / "report", progress=progress)
    stages["evaluate_s"] = time.perf_counter() - started
    result = {"data": str(data), "config": asdict(config), "stages": stages, "failed": failed, "metrics": metrics}
    write_text_atomic(out / "benchmark.json", metrics_json(result))
    progress(
        f"benchmark done: train {stages['train_s']:.0f} s, score {stages['score_s']:.0f} s "
        f"({stages['score_images_per_s']:.1f} images/s), evaluate {stages['evaluate_s']:.0f} s; "
        f"report: {out / 'report' / 'report.html'}"
    )
    return result
