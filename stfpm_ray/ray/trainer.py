"""Ray Tune and Ray Train around the fit recipe: one ``TorchTrainer`` per category, as many at once as fit.

Why a Ray Tune grid over categories, each trial building one ``TorchTrainer``, rather than driver threads
that call several ``TorchTrainer.fit()`` at once: it is Ray's documented pattern for many independent
Train V2 runs, and Tune supplies what the threads would have to re-implement by hand:

* a concurrency limit (``max_concurrent_trials``) computed from the cluster's resources, so runs start as
  resources allow instead of all placing half their workers and waiting;
* per-epoch metrics delivered to the driver (``TuneReportCallback`` forwards each ``ray.train.report`` to
  the trial, a Tune callback prints it), so progress works without ``log_to_driver``;
* restart of a trial whose driver process died (Tune ``FailureConfig``), on top of Ray Train restarting
  failed workers from their last checkpoint (Train ``FailureConfig``).

A trial only waits on its Train controller, so it reserves a little memory and no CPU: a CPU per trial
would starve the workers of a small cluster (on two cores, two trials would hold both and no worker
could start). The workers run :func:`stfpm_ray.ray.train_worker.worker_loop`; each category's final
checkpoint is copied from Ray Train storage into ``CKPT_DIR/<category>/`` whole or not at all
(:func:`stfpm_ray.store.checkpoint_folder.install_folder`), so multi-node clusters work (the worker's disk
is not the driver's; Ray Train storage must then be shared, see ``--storage-path``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from stfpm_ray.core.checkpoint import CheckpointError, read_meta
from stfpm_ray.core.fit import TrainConfig
from stfpm_ray.core.fit_report import CategoryResult, format_epoch
from stfpm_ray.progress import Progress
from stfpm_ray.ray.loopback_torch import loopback_torch_config
from stfpm_ray.ray.resources import TrainResources, category_concurrency
from stfpm_ray.ray.session import cluster_capacity, init_ray
from stfpm_ray.ray.train_worker import worker_loop
from stfpm_ray.store.checkpoint_folder import install_folder
from stfpm_ray.store.fs import resolve

# What a trial (the Train driver of one category) reserves: it only waits on its controller.
TRIAL_MEMORY_BYTES = 128 * 2**20
FINAL_KEYS = ("epoch", "best_epoch", "best_val_loss", "threshold", "started_at", "finished_at")


@dataclass(frozen=True)
class TrainJob:
    """What every trial of one training run shares."""

    root: str
    config: TrainConfig
    resources: TrainResources
    storage_path: str
    run_id: str


def _last_line(error: object) -> str:
    """The last line of an error's text: Ray's errors carry whole remote tracebacks."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else repr(error)


def _drive_category(tune_config: dict[str, Any], job: TrainJob) -> dict[str, Any]:
    """Run one category's TorchTrainer; returns where its final checkpoint lies, or why it failed."""
    category = tune_config["category"]
    resources = {"CPU": job.resources.cpus_per_worker}
    if job.resources.gpus > 0:
        resources["GPU"] = job.resources.gpus
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "root": job.root,
            "category": category,
            "config": job.config,
        },
        torch_config=loopback_torch_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.resources.workers_per_category,
            use_gpu=job.resources.gpus > 0,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=f"{job.run_id}-train-{category}",
            storage_path=job.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=job.resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    started = time.time()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        return {
            "category_error": f"training failed after {job.resources.max_failures} restarts: {_last_line(exc)}",
            "seconds": time.time() - started,
        }
    if result.return_value is not None or result.checkpoint is None:
        return {
            "category_error": result.return_value or "training ended without a checkpoint",
            "seconds": time.time() - started,
        }
    summary = {key: result.metrics[key] for key in FINAL_KEYS}  # not "history": it was printed already
    return {**summary, "checkpoint_path": result.checkpoint.path, "seconds": time.time() - started}


def _install_checkpoint(storage_path: str, checkpoint_path: str, target: Path) -> None:
    """Copy a reported checkpoint from Ray Train storage into ``target``, refusing anything incomplete."""
    filesystem = resolve(storage_path).filesystem  # the filesystem Ray Train wrote storage_path with

    def fill(staging: Path) -> None:
        ray.train.Checkpoint(checkpoint_path, filesystem=filesystem).to_directory(str(staging))
        read_meta(staging)  # refuse to install anything that is not a complete core checkpoint

    install_folder(target, fill)


class Tracker(tune.Callback):
    """Prints each category's epochs as they are reported and installs finished checkpoints.

    Each epoch is printed once: after a restart the workers repeat the epochs since their last resumable
    checkpoint (:data:`~stfpm_ray.ray.train_worker.CHECKPOINT_INTERVAL_S`), with the same results, and the
    "resumed" line already says where they went on from.
    """

    def __init__(self, job: TrainJob, out_dir: Path, progress: Progress, total: int) -> None:
        self.job, self.out_dir, self.progress, self.total = job, out_dir, progress, total
        self.results: dict[str, CategoryResult] = {}
        self.rates: dict[str, list[float]] = {}
        self.last_epoch: dict[str, dict[str, Any]] = {}
        self.printed: dict[str, int] = {}  # the last epoch printed per category
        # wall time and epochs done that the ETA counts from: the trial's (re)start, then its first report, so
        # that start-up (workers, decoding, the first epoch's teacher cache) does not count as epoch time
        self.started: dict[str, tuple[float, int]] = {}
        self.reported: set[str] = set()  # categories whose ETA counts from their first report since (re)start

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (callbacks included) for Tuner.restore; what lives only on this
        # driver (the progress function, results so far) is left out: it may not pickle.
        return {
            "job": self.job,
            "out_dir": self.out_dir,
            "progress": print,
            "total": self.total,
            "results": {},
            "rates": {},
            "last_epoch": {},
            "printed": {},
            "started": {},
            "reported": set(),
        }

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started[trial.config["category"]] = (time.time(), 0)
        self.reported.discard(trial.config["category"])
        self.progress(f"[{trial.config['category']}] started")

    def _seconds_per_epoch(self, category: str, last: dict[str, Any]) -> float | None:
        """The category's mean epoch time up to ``last``, the newest epoch of a report (a report may bring several
        epochs that all arrive now: only the newest one's time is known)."""
        began, first = self.started.get(category, (time.time(), 0))
        done = last["epoch"] - first
        return (time.time() - began) / done if done > 0 else None

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        category = trial.config["category"]
        if "resumed_from" in result:
            self.started[category] = (time.time(), int(result["resumed_from"]))
            self.reported.discard(category)
            self.progress(f"[{category}] resumed from its checkpoint after epoch {result['resumed_from']}")
        if "history" in result:
            self.last_epoch[category] = {**result, **result["history"][-1]} if result["history"] else result
        history = result.get("history") or ()
        per_epoch = self._seconds_per_epoch(category, history[-1]) if history else None
        for epoch in history:
            if epoch["epoch"] <= self.printed.get(category, 0):
                continue
            if category not in self.printed and "input_size" in epoch:
                height, width = epoch["input_size"]
                self.progress(f"[{category}] images resized to {height}x{width} px (height x width)")
            self.printed[category] = epoch["epoch"]
            self.rates.setdefault(category, []).append(epoch["images_per_s"])
            eta = None if per_epoch is None else per_epoch * (epoch["epochs"] - epoch["epoch"])
            self.progress(format_epoch(category, epoch, eta))
        if history and category not in self.reported:
            self.started[category] = (time.time(), int(history[-1]["epoch"]))
            self.reported.add(category)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.finish(trial.config["category"], trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.finish(trial.config["category"], {"category_error": f"trial failed: {_last_line(trial.get_error())}"})

    def finish(self, category: str, outcome: dict[str, Any]) -> None:
        error = outcome.get("category_error")
        if error is None:
            try:
                _install_checkpoint(self.job.storage_path, outcome["checkpoint_path"], self.out_dir / category)
            except (OSError, CheckpointError, KeyError) as exc:
                error = f"could not install the checkpoint: {exc}"
        last = outcome if error is None else self.last_epoch.get(category, {})
        rates = self.rates.get(category, [])
        self.results[category] = CategoryResult(
            category=category,
            ok=error is None,
            error=error,
            epochs=int(last.get("epoch", 0)),
            best_epoch=int(last.get("best_epoch", -1)),
            best_val_loss=float(last.get("best_val_loss", math.nan)),
            threshold=float(outcome.get("threshold", math.nan)),
            seconds=float(outcome.get("seconds", math.nan)),
            images_per_s=sum(rates) / len(rates) if rates else math.nan,
            checkpoint_dir=str(self.out_dir / category) if error is None else None,
            started_at=float(last.get("started_at", math.nan)),
            finished_at=float(outcome.get("finished_at", math.nan)),
            status="trained" if error is None else "failed",
        )
        finished = f"({len(self.results)}/{self.total or len(self.results)} categories finished)"
        self.progress(f"[{category}] " + (f"done {finished}" if error is None else f"FAILED: {error} {finished}"))


def train_on_ray(
    categories: list[str], job: TrainJob, out_dir: Path, progress: Progress, address: str | None = None
) -> dict[str, CategoryResult]:
    """Train ``categories`` on the Ray cluster, installing each checkpoint into ``out_dir/<category>``.

    Never raises for a category that fails: its result carries the error.
    """
    init_ray(address)
    capacity = cluster_capacity()
    job = replace(job, resources=job.resources.sized_for(capacity, len(categories), job.config.threads))
    res = job.resources
    concurrency = category_concurrency(capacity, res)
    progress(
        f"training {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}, "
        f"{min(concurrency, len(categories))} at a time, {res.workers_per_category} worker(s) each with "
        f"{res.cpus_per_worker:g} CPUs and {res.gpus:g} GPUs "
        f"({'GPU training' if res.gpus else f'CPU training on {job.config.threads} threads'}, fp32); "
        f"run {job.run_id}, Ray Train state in {job.storage_path}"
    )
    tracker = Tracker(job, out_dir, progress, len(categories))
    trainable = tune.with_resources(tune.with_parameters(_drive_category, job=job), {"memory": TRIAL_MEMORY_BYTES})
    tuner = tune.Tuner(
        trainable,
        param_space={"category": tune.grid_search(categories)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=False),
        run_config=tune.RunConfig(
            name=f"{job.run_id}-tune",
            storage_path=job.storage_path,
            verbose=0,
            callbacks=[tracker],
            failure_config=tune.FailureConfig(max_failures=job.resources.max_failures),
        ),
    )
    tuner.fit()
    for category in categories:
        if category not in tracker.results:  # Tune stopped before this trial ended (e.g. Ctrl+C)
            tracker.finish(category, {"category_error": "interrupted (run again with --resume to continue)"})
    return tracker.results
