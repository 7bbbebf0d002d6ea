"""``stfpm-ray benchmark``: train every category, score every test split, evaluate, print the table.

This is the whole product in one command, as users run it to benchmark all 15 MVTec AD categories at once.
Without ``--data`` it runs the embedded demo: a synthetic MVTec-layout dataset is generated into
``OUT/data`` and trained with a small preset (128 px, 20 epochs) so that a fresh machine finishes in minutes.
Outputs: ``OUT/checkpoints/<category>/``, ``OUT/scores/`` (Parquet), ``OUT/report/`` (metrics and HTML),
``OUT/benchmark.json`` (stage timings and the metrics).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from stfpm_ray.ray import score as ray_score, train as ray_train
from stfpm_ray.evaluate.evaluation import evaluate_scores
from stfpm_ray.data.mvtec import resolve_categories
from stfpm_ray.evaluate.report import metrics_json
from stfpm_ray.ray.session import init_ray
from stfpm_ray.data.synth import generate_dataset

# The embedded demo: small enough for two CPU cores, large enough for meaningful AUROC.
DEMO_DATA = {"categories": 3, "size": 128, "n_train": 40, "n_test": 20, "seed": 0}
DEMO_TRAINING = {"image_size": 128, "epochs": 20}


def run_benchmark(
    data: str | Path | None,
    out: str | Path,
    categories: str = "all",
    train_options: dict | None = None,
    score_options: dict | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] = print,
) -> dict:
    """Train, score and evaluate; return ``{"stages": {...seconds}, "metrics": {...}, "failed": [...]}``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its benchmark, or another --out")
    train_options = dict(train_options or {})
    config = train_options.pop("config")
    stages: dict[str, float] = {}
    if data is None:
        data = out / "data"
        if not (data.exists() and any(data.iterdir())):
            progress(f"no --data given: generating the synthetic demo dataset in {data}")
            generate_dataset(data, progress=progress, **DEMO_DATA)
    names = resolve_categories(data, categories)

    started = time.perf_counter()
    results = ray_train.train_categories(
        data, names, out / "checkpoints", config, overwrite=overwrite, progress=progress, **train_options
    )
    stages["train_s"] = time.perf_counter() - started
    trained = [r.category for r in results if r.ok]
    failed = [r.category for r in results if not r.ok]
    if not trained:
        raise RuntimeError(f"no category trained successfully: {failed}")

    started = time.perf_counter()
    summary = ray_score.score_images(
        out / "checkpoints", [str(Path(data) / name / "test") for name in trained], out / "scores",
        overwrite=True, progress=progress, **(score_options or {}),
    )
    stages["score_s"] = time.perf_counter() - started
    stages["score_images_per_s"] = summary.rows_written / stages["score_s"] if stages["score_s"] else 0.0

    started = time.perf_counter()
    metrics = evaluate_scores(out / "scores", out / "report", progress=progress)
    stages["evaluate_s"] = time.perf_counter() - started
    result = {"data": str(data), "config": asdict(config), "stages": stages, "failed": failed, "metrics": metrics}
    (out / "benchmark.json").write_text(metrics_json(result))
    progress(
        f"benchmark done: train {stages['train_s']:.0f} s, score {stages['score_s']:.0f} s "
        f"({stages['score_images_per_s']:.1f} images/s), evaluate {stages['evaluate_s']:.0f} s; "
        f"report: {out / 'report' / 'report.html'}"
    )
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="MVTec-layout root (default: generate a synthetic demo dataset in OUT/data)")
    parser.add_argument("--out", required=True, help="benchmark folder: checkpoints/, scores/, report/")
    parser.add_argument("--categories", default="all", help="comma-separated category names, or 'all' (default)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous benchmark in OUT")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    ray_train.add_training_options(parser, demo_defaults=DEMO_TRAINING)
    ray_score.add_scoring_options(parser, batch_size_flag="--score-batch-size")


def run(args: argparse.Namespace) -> int:
    init_ray(args.address)
    config = ray_train.config_from_args(args)
    if args.data is None:
        config = replace(config, **{k: v for k, v in DEMO_TRAINING.items() if getattr(args, k) is None})
    result = run_benchmark(
        args.data, args.out, args.categories,
        train_options={"config": config, **ray_train.resource_options(args)},
        score_options=ray_score.scoring_options(args),
        overwrite=args.overwrite,
    )
    return 1 if result["failed"] else 0
