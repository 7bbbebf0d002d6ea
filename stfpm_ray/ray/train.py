"""``stfpm-ray train``: one student per category with Ray Train, as many categories at once as fit.

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
could start).

Each worker runs the core's :class:`~stfpm_ray.core.fit.StudentFitter` (the same loop as the plain-PyTorch
``fit_category``). After every epoch rank 0 reports its metrics with a resumable checkpoint
(``StudentFitter.state_dict``), except that epochs shorter than ``REPORT_INTERVAL_S`` are reported together:
Ray Train collects one report per controller poll (2 s), so a report per sub-second epoch (small
categories, GPUs) would stall the loop; each report carries every epoch since the last one, so the driver
still prints one line per epoch. The last report is the core checkpoint format itself, which the driver
copies from Ray Train storage into ``CKPT_DIR/<category>/`` through a temporary folder and a rename: the
output never holds half a checkpoint, and multi-node clusters work (the worker's disk is not the
driver's; Ray Train storage must then be shared, see ``--storage-path``).

``CKPT_DIR/_run.json`` records the run's identity (data root, training config, workers) and its id; the
id names the Ray Train runs, so ``--resume`` finds the interrupted runs' state and a fresh run never
picks up another run's state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stfpm_ray.core.checkpoint import META_FILE, CheckpointError, read_meta, save_checkpoint
from stfpm_ray.core.fit import (
    StudentFitter,
    TrainConfig,
    build_meta,
    prepare_category,
    seed_everything,
    validation_scores,
)
from stfpm_ray.core.model import STFPM
from stfpm_ray.data.mvtec import DatasetError, resolve_categories
from stfpm_ray.ray.session import cluster_capacity, init_ray
from stfpm_ray.core.teacher import WeightsError, load_teacher

RUN_FILE = "_run.json"
DEFAULT_STORAGE_DIR = "_ray"
STATE_FILE = "train_state.pt"
# Ray Train's controller collects one report per worker per poll (every 2 s by default) and a worker's next
# report waits for that: epochs shorter than this are reported (and checkpointed) together.
REPORT_INTERVAL_S = 2.0
# What a trial (the Train driver of one category) reserves: it only waits on its controller.
TRIAL_MEMORY_BYTES = 128 * 2**20

Progress = Callable[[str], None]


@dataclass
class CategoryResult:
    """Outcome of one category; ``status`` is ``trained``, ``complete`` (kept from before) or ``failed``.

    ``started_at``/``finished_at`` (Unix time, NaN when unknown) bound the worker's training loop, first
    attempt to final checkpoint; ``seconds`` is the category's wall time on the driver, start-up included;
    ``images_per_s`` is the mean training rate of the epochs this run trained.
    """

    category: str
    ok: bool
    error: str | None
    epochs: int
    best_epoch: int
    best_val_loss: float
    threshold: float
    seconds: float
    images_per_s: float
    checkpoint_dir: str | None
    started_at: float
    finished_at: float
    status: str = "trained"


@dataclass(frozen=True)
class _Job:
    """What every trial and worker of one ``train_categories`` call shares."""

    root: str
    config: TrainConfig
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    storage_path: str
    run_id: str
    max_failures: int


# --------------------------------------------------------------------------------------------------
# Worker side: runs in every Ray Train worker of one category.


def _report_checkpoint(metrics: dict[str, Any], write: Callable[[Path], object]) -> None:
    """Report on every rank (a barrier); only rank 0 attaches a checkpoint folder filled by ``write``."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="stfpm-ckpt-") as folder:
        write(Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision on every rank: reports are collective, so every rank must make the same ones."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    decision = torch.tensor([int(flag)], device=device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def _worker_loop(loop_config: dict[str, Any]) -> str | None:
    """Fit one category's student, resuming from the last reported checkpoint after a restart.

    Returns why the category cannot be trained (bad data or teacher weights), None after training.
    """
    import ray.train
    import ray.train.torch

    job: _Job = loop_config["job"]
    category: str = loop_config["category"]
    config = job.config
    torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    previous = ray.train.get_checkpoint()
    state: dict[str, Any] | None = None
    if previous is not None:
        with previous.as_directory() as folder:
            if (Path(folder) / META_FILE).is_file():
                return None  # the final checkpoint was reported before the restart: nothing left to do
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)

    seed_everything(config.seed)
    try:
        train, val, problems = prepare_category(job.root, category, config)
        teacher = load_teacher(config.backbone, config.layers, config.weights)
    except (DatasetError, WeightsError) as exc:
        # Bad data fails the same way on every retry: return it instead of raising into FailureConfig.
        return f"{type(exc).__name__}: {exc}"
    model: torch.nn.Module = STFPM(teacher, config.backbone, config.layers, seed=config.seed).to(device)
    if world_size > 1:
        # The features-only student holds stages after the last tapped one (EfficientNet keeps all its
        # blocks): their parameters get no gradient, which DDP must be told about.
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    fitter = StudentFitter(model, config, train, val, device=device, rank=rank, world_size=world_size)
    started_at = time.time()
    resumed_from: int | None = None
    if state is not None:
        fitter.load_state_dict(state["fitter"])
        started_at, resumed_from = state["started_at"], fitter.epoch

    def write_state(folder: Path) -> None:
        torch.save({"fitter": fitter.state_dict(), "started_at": started_at}, folder / STATE_FILE)

    # Each report carries the epochs since the previous one ("history"), so the driver prints every epoch.
    history: list[dict[str, Any]] = []
    last_report = time.monotonic()
    while fitter.epoch < config.epochs:
        epoch: dict[str, Any] = {**fitter.train_epoch(), **fitter.validate()}
        # Each worker saw 1/world_size of the epoch in the same time: the group's rate is world_size times.
        epoch.update(epoch=fitter.epoch, epochs=config.epochs, images_per_s=epoch["images_per_s"] * world_size)
        history.append(epoch)
        due = time.monotonic() - last_report >= REPORT_INTERVAL_S and fitter.epoch < config.epochs
        if _rank0_decides(due, device):
            # A tuple: Tune's TensorBoard logger would try to plot a list as a histogram.
            metrics = {**epoch, "history": tuple(history), "started_at": started_at}
            if resumed_from is not None:
                metrics["resumed_from"], resumed_from = resumed_from, None
            _report_checkpoint(metrics, write_state)
            history, last_report = [], time.monotonic()

    fitter.restore_best()
    scores = validation_scores(fitter.core, val, config.batch_size, device)
    meta = build_meta(
        category, config, teacher, fitter, scores,
        {"seconds": time.time() - started_at, "skipped_images": problems, "workers": world_size},
    )
    final = {
        "final": True, "epoch": fitter.epoch, "epochs": config.epochs, "best_epoch": fitter.best_epoch,
        "best_val_loss": fitter.best_val_loss, "threshold": meta.threshold, "history": tuple(history),
        "started_at": started_at, "finished_at": time.time(),
    }
    if resumed_from is not None:
        final["resumed_from"] = resumed_from
    _report_checkpoint(final, lambda folder: save_checkpoint(folder, fitter.core.student, meta))
    return None


# --------------------------------------------------------------------------------------------------
# Trial side: one Tune trial per category drives one TorchTrainer.

FINAL_KEYS = ("epoch", "best_epoch", "best_val_loss", "threshold", "started_at", "finished_at")


def _drive_category(tune_config: dict[str, Any], job: _Job) -> dict[str, Any]:
    """Run one category's TorchTrainer; returns where its final checkpoint lies, or why it failed."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    category = tune_config["category"]
    resources = {"CPU": job.cpus_per_worker}
    if job.gpus_per_worker > 0:
        resources["GPU"] = job.gpus_per_worker
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "category": category},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.workers, use_gpu=job.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"{job.run_id}-train-{category}",
            storage_path=job.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    started = time.time()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        return {"category_error": f"training failed after {job.max_failures} restarts: {_last_line(exc)}",
                "seconds": time.time() - started}
    if result.return_value is not None or result.checkpoint is None:
        return {"category_error": result.return_value or "training ended without a checkpoint",
                "seconds": time.time() - started}
    summary = {key: result.metrics[key] for key in FINAL_KEYS}  # not "history": it was printed already
    return {**summary, "checkpoint_path": result.checkpoint.path, "seconds": time.time() - started}


# --------------------------------------------------------------------------------------------------
# Driver side.


def _last_line(error: object) -> str:
    """The last line of an error's text: Ray's errors carry whole remote tracebacks."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else repr(error)


def _storage_filesystem(storage_path: str):
    """The pyarrow filesystem Ray Train writes ``storage_path`` with (local folder or URI)."""
    import pyarrow.fs

    if "://" in storage_path:
        return pyarrow.fs.FileSystem.from_uri(storage_path)[0]
    return pyarrow.fs.LocalFileSystem()


def _install_checkpoint(storage_path: str, checkpoint_path: str, target: Path) -> None:
    """Copy a reported checkpoint into ``target`` through a sibling temp folder and a rename."""
    from ray.train import Checkpoint

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        Checkpoint(checkpoint_path, filesystem=_storage_filesystem(storage_path)).to_directory(str(staging))
        read_meta(staging)  # refuse to install anything that is not a complete core checkpoint
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def format_epoch(category: str, metrics: dict[str, Any]) -> str:
    """One progress line per category and epoch."""
    return (
        f"[{category}] epoch {metrics['epoch']}/{metrics['epochs']} train_loss={metrics['train_loss']:.5f} "
        f"val_loss={metrics['val_loss']:.5f} best={metrics['best_val_loss']:.5f}@{metrics['best_epoch']} "
        f"{metrics['images_per_s']:.1f} img/s"
    )


def format_summary(results: list[CategoryResult]) -> str:
    """A fixed-width table a person reads at the end of a run."""
    header = f"{'category':<20} {'epochs':>6} {'best val loss':>13} {'threshold':>10} {'wall s':>8}  status"
    lines = [header, "-" * len(header)]
    for r in results:
        status = r.status if r.ok else f"failed: {r.error}"
        lines.append(
            f"{r.category:<20} {r.epochs:>6} {r.best_val_loss:>13.5f} {r.threshold:>10.5f} "
            f"{r.seconds:>8.1f}  {status}"
        )
    return "\n".join(lines)


def _tracker_class():
    """The Tune callback, defined lazily so that importing this module does not import Ray Tune."""
    from ray import tune

    class Tracker(tune.Callback):
        """Prints each category's epochs as they are reported and installs finished checkpoints."""

        def __init__(self, job: _Job, out_dir: Path, progress: Progress) -> None:
            self.job, self.out_dir, self.progress = job, out_dir, progress
            self.results: dict[str, CategoryResult] = {}
            self.rates: dict[str, list[float]] = {}
            self.last_epoch: dict[str, dict[str, Any]] = {}

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its run config (callbacks included) for Tuner.restore; what lives only on this
            # driver (the progress function, results so far) is left out: it may not pickle (e.g. print).
            return {"job": self.job, "out_dir": self.out_dir, "progress": print,
                    "results": {}, "rates": {}, "last_epoch": {}}

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.progress(f"[{trial.config['category']}] started")

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            category = trial.config["category"]
            if "resumed_from" in result:
                self.progress(f"[{category}] resumed from its checkpoint after epoch {result['resumed_from']}")
            if "history" in result:
                self.last_epoch[category] = {**result, **result["history"][-1]} if result["history"] else result
            for epoch in result.get("history", []):
                self.rates.setdefault(category, []).append(epoch["images_per_s"])
                self.progress(format_epoch(category, epoch))

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
            self.progress(f"[{category}] " + ("done" if error is None else f"FAILED: {error}"))

    return Tracker


def _complete_result(out_dir: Path, category: str) -> CategoryResult | None:
    """The result of a category whose checkpoint is already complete in ``out_dir``, else None."""
    folder = out_dir / category
    if not (folder / META_FILE).is_file():
        return None
    meta = read_meta(folder)
    training = meta.training
    return CategoryResult(
        category=category, ok=True, error=None, epochs=int(training.get("epochs", 0)),
        best_epoch=int(training.get("best_epoch", -1)), best_val_loss=float(training.get("best_val_loss", math.nan)),
        threshold=meta.threshold, seconds=float(training.get("seconds", math.nan)), images_per_s=math.nan,
        checkpoint_dir=str(folder), started_at=math.nan, finished_at=math.nan, status="complete",
    )


def _claim_out_dir(out_dir: Path, identity: dict[str, Any], storage_path: str | None, resume: bool,
                   overwrite: bool) -> tuple[str, str]:
    """Decide whether this run may write into ``out_dir``; returns (run id, Ray Train storage path).

    Two runs' files never mix: a folder that holds a run is refused unless ``resume`` (same identity,
    same run id, so Ray Train finds the interrupted state) or ``overwrite`` (emptied, new run id).
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a folder")
    record_path = out_dir / RUN_FILE
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and not record_path.is_file():
        raise FileExistsError(
            f"output folder {out_dir} is not empty and holds no {RUN_FILE}, so it was not written by "
            "`stfpm-ray train`; choose an empty or new folder"
        )
    if entries and resume:
        record = json.loads(record_path.read_text())
        changed = sorted(k for k in identity.keys() | record["identity"].keys()
                         if identity.get(k) != record["identity"].get(k))
        if changed:
            was = ", ".join(f"{k}={record['identity'].get(k)!r}" for k in changed)
            now = ", ".join(f"{k}={identity.get(k)!r}" for k in changed)
            raise ValueError(f"cannot --resume {out_dir}: it was trained with {was}, this run asks for {now}; "
                             "use the same settings, or --overwrite")
        if storage_path is not None and storage_path != record["storage_path"]:
            raise ValueError(f"cannot --resume {out_dir}: its Ray Train state is in {record['storage_path']}, "
                             f"not {storage_path}")
        return record["run_id"], record["storage_path"]
    if entries and not overwrite:
        done = [name for name in entries if (out_dir / name / META_FILE).is_file()]
        raise FileExistsError(
            f"output folder {out_dir} already holds a training run ({len(done)} finished categories); "
            "pass --resume to finish it or --overwrite to replace it"
        )
    for name in entries:  # overwrite: the folder is known to be a previous run's output
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    storage = storage_path or str(out_dir / DEFAULT_STORAGE_DIR)
    staging = out_dir / f".{RUN_FILE}.tmp"
    staging.write_text(json.dumps({"run_id": run_id, "storage_path": storage, "identity": identity}, indent=2))
    os.replace(staging, record_path)
    return run_id, storage


def _concurrency(ray_resources: dict[str, float], workers: int, cpus: float, gpus: float) -> int:
    """How many categories the cluster holds at once; a category that never fits is an error."""
    need = {"CPU": workers * cpus, "GPU": workers * gpus}
    fits = [math.floor(ray_resources.get(key, 0.0) / amount + 1e-9) for key, amount in need.items() if amount > 0]
    count = min(fits) if fits else 1
    if count < 1:
        have = {key: ray_resources.get(key, 0.0) for key in need}
        raise ValueError(f"one category needs {need} ({workers} workers) but the Ray cluster has {have}; "
                         "lower --workers-per-category, --cpus-per-worker or --gpus-per-worker")
    return count


def train_categories(
    root: str | Path,
    categories: list[str],
    out_dir: str | Path,
    config: TrainConfig,
    workers_per_category: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    storage_path: str | None = None,
    max_failures: int = 2,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress = print,
    address: str | None = None,
) -> list[CategoryResult]:
    """Fit one student per category with Ray Train, concurrently; checkpoints go to ``out_dir/<category>``.

    Never raises for a category that fails (its result carries the error); raises ``ValueError`` /
    ``FileExistsError`` for bad settings or an output folder this run may not write into.
    """
    if workers_per_category < 1 or cpus_per_worker <= 0 or gpus_per_worker < 0 or max_failures < -1:
        raise ValueError("need workers per category >= 1, CPUs per worker > 0, GPUs per worker >= 0, "
                         "max failures >= -1")
    root_path, out_path = Path(root).resolve(), Path(out_dir).resolve()
    if storage_path is not None and "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())  # Ray changes the working folder of trials
    try:
        load_teacher(config.backbone, config.layers, config.weights)  # fail here, not in every worker
    except WeightsError as exc:
        raise ValueError(str(exc)) from exc
    identity = json.loads(json.dumps({"root": str(root_path), "config": asdict(config),
                                      "workers_per_category": workers_per_category}))
    run_id, storage = _claim_out_dir(out_path, identity, storage_path, resume, overwrite)

    complete = {c: r for c in categories if (r := _complete_result(out_path, c)) is not None}
    for category in complete:
        progress(f"[{category}] already complete in {out_path / category}, skipped")
    pending = [c for c in categories if c not in complete]
    results: dict[str, CategoryResult] = dict(complete)
    if pending:
        results.update(_run_trials(pending, _Job(
            root=str(root_path), config=config, workers=workers_per_category, cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker, storage_path=storage, run_id=run_id, max_failures=max_failures,
        ), out_path, progress, address))
    ordered = [results[c] for c in categories]
    progress(format_summary(ordered))
    return ordered


def _run_trials(categories: list[str], job: _Job, out_dir: Path, progress: Progress,
                address: str | None) -> dict[str, CategoryResult]:
    import ray
    from ray import tune

    init_ray(address)
    concurrency = _concurrency(cluster_capacity(), job.workers, job.cpus_per_worker, job.gpus_per_worker)
    progress(f"training {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}, "
             f"{min(concurrency, len(categories))} at a time, {job.workers} worker(s) each; "
             f"run {job.run_id}, Ray Train state in {job.storage_path}")
    tracker = _tracker_class()(job, out_dir, progress)
    trainable = tune.with_resources(tune.with_parameters(_drive_category, job=job),
                                    {"memory": TRIAL_MEMORY_BYTES})
    tuner = tune.Tuner(
        trainable,
        param_space={"category": tune.grid_search(categories)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=False),
        run_config=tune.RunConfig(
            name=f"{job.run_id}-tune", storage_path=job.storage_path, verbose=0, callbacks=[tracker],
            failure_config=tune.FailureConfig(max_failures=job.max_failures),
        ),
    )
    tuner.fit()
    missing = [c for c in categories if c not in tracker.results]
    for category in missing:  # Tune stopped before this trial ended (e.g. Ctrl+C)
        tracker.finish(category, {"category_error": "interrupted (run again with --resume to continue)"})
    return tracker.results


# --------------------------------------------------------------------------------------------------
# Command line.


# Flags that set TrainConfig fields: (flag, field, type, help).
_CONFIG_FLAGS = (
    ("--epochs", "epochs", int, "epochs per category"),
    ("--batch-size", "batch_size", int, "images per SGD step (split across a category's workers)"),
    ("--image-size", "image_size", int, "model input side in pixels, a multiple of 32"),
    ("--lr", "lr", float, "SGD learning rate"),
    ("--backbone", "backbone", str, "timm backbone of teacher and student"),
    ("--weights", "weights", str, "teacher weights: auto|offline|hub|file:PATH"),
    ("--seed", "seed", int, "seed of the validation split, student init and batch order"),
)


def add_training_options(parser: argparse.ArgumentParser, demo_defaults: dict[str, Any] | None = None) -> None:
    """The training and resource flags, shared with ``stfpm-ray benchmark``.

    Config flags default to None, meaning TrainConfig's default (or, in a command with ``demo_defaults``,
    the demo's), so that a caller can tell a value the user chose from a default.
    """
    defaults, demo = TrainConfig(), demo_defaults or {}
    for flag, field, kind, text in _CONFIG_FLAGS:
        default = f"{getattr(defaults, field)}" + (f"; demo: {demo[field]}" if field in demo else "")
        parser.add_argument(flag, type=kind, default=None, help=f"{text} (default {default})")
    parser.add_argument("--workers-per-category", type=int, default=1,
                        help="Ray Train workers per category; more than 1 trains data-parallel (DDP) "
                             "(default %(default)s)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="CPUs (and torch threads) per worker (default %(default)s)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="GPUs per worker, fractions allowed (default %(default)s)")
    parser.add_argument("--storage-path", default=None,
                        help="Ray Train run state, a local folder or URI (default CKPT_DIR/_ray); "
                             "multi-node clusters need storage every node reaches (NFS, s3://, gs://)")
    parser.add_argument("--max-failures", type=int, default=2,
                        help="restarts of a category's workers from its last checkpoint (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the flags of :func:`add_training_options`; unset flags keep TrainConfig's defaults."""
    chosen = {field: getattr(args, field) for _, field, _, _ in _CONFIG_FLAGS if getattr(args, field) is not None}
    return TrainConfig(**chosen)


def resource_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`train_categories` set by the resource flags."""
    return {
        "workers_per_category": args.workers_per_category, "cpus_per_worker": args.cpus_per_worker,
        "gpus_per_worker": args.gpus_per_worker, "storage_path": args.storage_path,
        "max_failures": args.max_failures,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset root in MVTec AD layout (ROOT/<category>/train/good)")
    parser.add_argument("--categories", default="all", help="comma-separated category names, or 'all' (default)")
    parser.add_argument("--out", required=True, help="checkpoint folder CKPT_DIR; one subfolder per category")
    add_training_options(parser)
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="finish the run in CKPT_DIR: skip complete categories, resume the others")
    mode.add_argument("--overwrite", action="store_true", help="delete the run in CKPT_DIR and start afresh")


def run(args: argparse.Namespace) -> int:
    """Exit code 0 only if every category has a checkpoint."""
    categories = resolve_categories(args.data, args.categories)
    results = train_categories(
        args.data, categories, args.out, config_from_args(args), resume=args.resume, overwrite=args.overwrite,
        address=args.address, **resource_options(args),
    )
    return 0 if all(r.ok for r in results) else 1
