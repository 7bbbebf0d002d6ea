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

Each worker runs the core's fit recipe, :func:`~stfpm_ray.core.fit.fit_category`, with a report hook: after
every epoch rank 0 reports its metrics with a resumable checkpoint (:func:`~stfpm_ray.core.fit.resume_state`),
except that epochs shorter than ``REPORT_INTERVAL_S`` are reported together:
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

import json
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from stfpm_ray.core.checkpoint import META_FILE, CheckpointError, read_meta, save_checkpoint
from stfpm_ray.core.fit import StudentFitter, TrainConfig, fit_category, resume_state
from stfpm_ray.core.teacher import WeightsError, load_teacher
from stfpm_ray.data.mvtec import DatasetError
from stfpm_ray.errors import OutputExistsError, UserError
from stfpm_ray.progress import Progress, fixed_width_table, log_progress
from stfpm_ray.ray.session import cluster_capacity, init_ray
from stfpm_ray.store.fs import resolve, write_text_atomic

RUN_FILE = "_run.json"
DEFAULT_STORAGE_DIR = "_ray"
STATE_FILE = "train_state.pt"
# Ray Train's controller collects one report per worker per poll (every 2 s by default) and a worker's next
# report waits for that: epochs shorter than this are reported (and checkpointed) together.
REPORT_INTERVAL_S = 2.0
# What a trial (the Train driver of one category) reserves: it only waits on its controller.
TRIAL_MEMORY_BYTES = 128 * 2**20


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
class TrainResources:
    """How a training run uses the cluster (``stfpm-ray train`` and ``benchmark`` resource flags).

    ``storage_path`` holds Ray Train's run state (default ``CKPT_DIR/_ray``); multi-node clusters need
    storage every node reaches. ``max_failures`` restarts a category's workers from its last checkpoint.
    ``cpus_per_worker`` None sizes workers from the cluster (:meth:`sized_for`).
    """

    workers_per_category: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0
    storage_path: str | None = None
    max_failures: int = 2

    def __post_init__(self) -> None:
        cpus = 1.0 if self.cpus_per_worker is None else self.cpus_per_worker
        if self.workers_per_category < 1 or cpus <= 0 or self.gpus_per_worker < 0 or self.max_failures < -1:
            raise UserError(
                "need workers per category >= 1, CPUs per worker > 0, GPUs per worker >= 0, max failures >= -1"
            )

    def sized_for(self, capacity: dict[str, float], categories: int) -> TrainResources:
        """Unset CPUs per worker: the cluster's CPUs shared among the workers that train at once.

        One category on an N-core node then trains with N threads instead of leaving N-1 cores idle; many
        categories get a core each, as many at once as the CPUs (or, with GPUs, the GPUs) allow.
        """
        if self.cpus_per_worker is not None:
            return self
        workers, cpus = self.workers_per_category, capacity.get("CPU", 1.0)
        at_once = cpus // workers
        if self.gpus_per_worker > 0:
            at_once = min(at_once, capacity.get("GPU", 0.0) // (workers * self.gpus_per_worker))
        at_once = max(1, min(categories, int(at_once)))
        return replace(self, cpus_per_worker=float(max(1, int(cpus // (at_once * workers)))))


@dataclass(frozen=True)
class _Job:
    """What every trial and worker of one ``train_categories`` call shares."""

    root: str
    config: TrainConfig
    resources: TrainResources
    storage_path: str
    run_id: str


# --------------------------------------------------------------------------------------------------
# Worker side: runs in every Ray Train worker of one category.


def _report_checkpoint(metrics: dict[str, Any], write: Callable[[Path], object]) -> None:
    """Report on every rank (a barrier); only rank 0 attaches a checkpoint folder filled by ``write``."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="stfpm-ckpt-") as folder:
        write(Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision on every rank: reports are collective, so every rank must make the same ones."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    decision = torch.tensor([int(flag)], device=device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())


class _Reporter:
    """The fit recipe's epoch hook in a Train worker: reports epochs (batched, see REPORT_INTERVAL_S) with a
    resumable checkpoint. Each report carries the epochs since the previous one ("history"), so the driver
    prints every epoch."""

    def __init__(self, device: torch.device, resumed_from: int | None) -> None:
        self.device, self.resumed_from = device, resumed_from
        self.history: list[dict[str, Any]] = []
        self.last_report = time.monotonic()

    def take_extras(self, fitter: StudentFitter) -> dict[str, Any]:
        """``history`` and ``started_at`` of the next report (and ``resumed_from`` once after a restart)."""
        extras: dict[str, Any] = {"history": tuple(self.history), "started_at": fitter.started_at}
        if self.resumed_from is not None:
            extras["resumed_from"], self.resumed_from = self.resumed_from, None
        self.history, self.last_report = [], time.monotonic()
        return extras

    def __call__(self, fitter: StudentFitter, metrics: dict[str, Any]) -> None:
        epoch = {key: value for key, value in metrics.items() if key != "category"}
        self.history.append(epoch)
        due = time.monotonic() - self.last_report >= REPORT_INTERVAL_S and fitter.epoch < fitter.config.epochs
        if _rank0_decides(due, self.device):
            # A tuple: Tune's TensorBoard logger would try to plot a list as a histogram.
            report = {**epoch, **self.take_extras(fitter)}
            _report_checkpoint(report, lambda folder: torch.save(resume_state(fitter), folder / STATE_FILE))


def _previous_state() -> tuple[bool, dict[str, Any] | None]:
    """(final checkpoint already reported, resumable state or None) from the last reported checkpoint."""
    previous = ray.train.get_checkpoint()
    if previous is None:
        return False, None
    with previous.as_directory() as folder:
        if (Path(folder) / META_FILE).is_file():
            return True, None
        return False, torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def _prepare_ddp(model: torch.nn.Module) -> torch.nn.Module:
    # The features-only student holds stages after the last tapped one (EfficientNet keeps all its blocks):
    # their parameters get no gradient, which DDP must be told about.
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})


def _worker_loop(loop_config: dict[str, Any]) -> str | None:
    """The core fit recipe plus a report hook, resuming from the last reported checkpoint after a restart.

    Returns why the category cannot be trained (bad data or teacher weights), None after training.
    """
    job: _Job = loop_config["job"]
    config = job.config
    torch.set_num_threads(max(1, int(job.resources.cpus_per_worker)))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    finished, state = _previous_state()
    if finished:
        return None  # the final checkpoint was reported before the restart: nothing left to do
    reporter = _Reporter(device, None if state is None else state["fitter"]["epoch"])
    try:
        model, meta, fitter = fit_category(
            job.root,
            loop_config["category"],
            config,
            device=device,
            on_epoch=reporter,
            rank=rank,
            world_size=world_size,
            wrap_model=_prepare_ddp if world_size > 1 else None,
            resume=state,
            extra_meta={"workers": world_size},
        )
    except (DatasetError, WeightsError) as exc:
        # Bad data fails the same way on every retry: return it instead of raising into FailureConfig.
        return f"{type(exc).__name__}: {exc}"
    final = {
        "final": True,
        "epoch": fitter.epoch,
        "epochs": config.epochs,
        "best_epoch": fitter.best_epoch,
        "best_val_loss": fitter.best_val_loss,
        "threshold": meta.threshold,
        **reporter.take_extras(fitter),
        "finished_at": time.time(),
    }
    _report_checkpoint(final, lambda folder: save_checkpoint(folder, model.student, meta))
    return None


# --------------------------------------------------------------------------------------------------
# Trial side: one Tune trial per category drives one TorchTrainer.

FINAL_KEYS = ("epoch", "best_epoch", "best_val_loss", "threshold", "started_at", "finished_at")


def _drive_category(tune_config: dict[str, Any], job: _Job) -> dict[str, Any]:
    """Run one category's TorchTrainer; returns where its final checkpoint lies, or why it failed."""

    category = tune_config["category"]
    resources = {"CPU": job.resources.cpus_per_worker}
    if job.resources.gpus_per_worker > 0:
        resources["GPU"] = job.resources.gpus_per_worker
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "category": category},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.resources.workers_per_category,
            use_gpu=job.resources.gpus_per_worker > 0,
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


# --------------------------------------------------------------------------------------------------
# Driver side.


def _last_line(error: object) -> str:
    """The last line of an error's text: Ray's errors carry whole remote tracebacks."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else repr(error)


def _install_checkpoint(storage_path: str, checkpoint_path: str, target: Path) -> None:
    """Copy a reported checkpoint into ``target`` through a sibling temp folder and a rename.

    The staging folder is made with ``mkdir`` (modes from the umask, 0755 under the usual 022), not
    ``mkdtemp`` (always 0700), because it becomes the installed folder that other users of a shared cluster
    filesystem must read.
    """
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        filesystem = resolve(storage_path).filesystem  # the filesystem Ray Train wrote storage_path with
        ray.train.Checkpoint(checkpoint_path, filesystem=filesystem).to_directory(str(staging))
        read_meta(staging)  # refuse to install anything that is not a complete core checkpoint
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def format_epoch(category: str, metrics: dict[str, Any], eta_s: float | None = None) -> str:
    """One progress line per category and epoch; ``eta_s``: the category's remaining time."""
    eta = "" if eta_s is None else f", ETA {eta_s // 60:.0f}m{eta_s % 60:02.0f}s"
    return (
        f"[{category}] epoch {metrics['epoch']}/{metrics['epochs']} train_loss={metrics['train_loss']:.5f} "
        f"val_loss={metrics['val_loss']:.5f} best={metrics['best_val_loss']:.5f}@{metrics['best_epoch']} "
        f"{metrics['images_per_s']:.1f} img/s{eta}"
    )


def format_summary(results: list[CategoryResult]) -> str:
    """A fixed-width table a person reads at the end of a run."""
    rows = [
        (
            r.category,
            r.epochs,
            f"{r.best_val_loss:.5f}",
            f"{r.threshold:.5f}",
            f"{r.seconds:.1f}",
            r.status if r.ok else f"failed: {r.error}",
        )
        for r in results
    ]
    return fixed_width_table(("category", "epochs", "best val loss", "threshold", "wall s", "status"), rows, rule=True)


class Tracker(tune.Callback):
    """Prints each category's epochs as they are reported and installs finished checkpoints."""

    def __init__(self, job: _Job, out_dir: Path, progress: Progress) -> None:
        self.job, self.out_dir, self.progress = job, out_dir, progress
        self.results: dict[str, CategoryResult] = {}
        self.rates: dict[str, list[float]] = {}
        self.last_epoch: dict[str, dict[str, Any]] = {}
        self.started: dict[str, tuple[float, int]] = {}  # wall time and epochs done when a trial (re)started
        self.total = 0  # categories in this run, for "k/N done"

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (callbacks included) for Tuner.restore; what lives only on this
        # driver (the progress function, results so far) is left out: it may not pickle.
        return {
            "job": self.job,
            "out_dir": self.out_dir,
            "progress": print,
            "results": {},
            "rates": {},
            "last_epoch": {},
            "started": {},
            "total": 0,
        }

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started[trial.config["category"]] = (time.time(), 0)
        self.progress(f"[{trial.config['category']}] started")

    def _eta(self, category: str, epoch: dict[str, Any]) -> float | None:
        """Seconds left for the category, from its mean epoch time since it (re)started."""
        began, first = self.started.get(category, (time.time(), 0))
        done = epoch["epoch"] - first
        if done <= 0:
            return None
        return (time.time() - began) / done * (epoch["epochs"] - epoch["epoch"])

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        category = trial.config["category"]
        if "resumed_from" in result:
            self.started[category] = (time.time(), int(result["resumed_from"]))
            self.progress(f"[{category}] resumed from its checkpoint after epoch {result['resumed_from']}")
        if "history" in result:
            self.last_epoch[category] = {**result, **result["history"][-1]} if result["history"] else result
        for epoch in result.get("history", []):
            self.rates.setdefault(category, []).append(epoch["images_per_s"])
            self.progress(format_epoch(category, epoch, self._eta(category, epoch)))

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


def _complete_result(out_dir: Path, category: str) -> CategoryResult | None:
    """The result of a category whose checkpoint is already complete in ``out_dir``, else None."""
    folder = out_dir / category
    if not (folder / META_FILE).is_file():
        return None
    meta = read_meta(folder)
    training = meta.training
    return CategoryResult(
        category=category,
        ok=True,
        error=None,
        epochs=int(training.get("epochs", 0)),
        best_epoch=int(training.get("best_epoch", -1)),
        best_val_loss=float(training.get("best_val_loss", math.nan)),
        threshold=meta.threshold,
        seconds=float(training.get("seconds", math.nan)),
        images_per_s=math.nan,
        checkpoint_dir=str(folder),
        started_at=math.nan,
        finished_at=math.nan,
        status="complete",
    )


def _claim_out_dir(
    out_dir: Path, identity: dict[str, Any], storage_path: str | None, resume: bool, overwrite: bool
) -> tuple[str, str]:
    """Decide whether this run may write into ``out_dir``; returns (run id, Ray Train storage path).

    Two runs' files never mix: a folder that holds a run is refused unless ``resume`` (same identity,
    same run id, so Ray Train finds the interrupted state) or ``overwrite`` (emptied, new run id).
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
        return record["run_id"], record["storage_path"]
    if entries and not overwrite:
        done = [name for name in entries if (out_dir / name / META_FILE).is_file()]
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
    write_text_atomic(
        record_path, json.dumps({"run_id": run_id, "storage_path": storage, "identity": identity}, indent=2)
    )
    return run_id, storage


def _concurrency(ray_resources: dict[str, float], workers: int, cpus: float, gpus: float) -> int:
    """How many categories the cluster holds at once; a category that never fits is an error."""
    need = {"CPU": workers * cpus, "GPU": workers * gpus}
    fits = [math.floor(ray_resources.get(key, 0.0) / amount + 1e-9) for key, amount in need.items() if amount > 0]
    count = min(fits) if fits else 1
    if count < 1:
        have = {key: ray_resources.get(key, 0.0) for key in need}
        raise UserError(
            f"one category needs {need} ({workers} workers) but the Ray cluster has {have}; "
            "lower --workers-per-category, --cpus-per-worker or --gpus-per-worker"
        )
    return count


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

    Never raises for a category that fails (its result carries the error); raises a
    :class:`~stfpm_ray.errors.StfpmError` for bad settings or an output folder this run may not write into.
    """
    root_path, out_path = Path(root).resolve(), Path(out_dir).resolve()
    storage_path = resources.storage_path
    if storage_path is not None and "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())  # Ray changes the working folder of trials
    load_teacher(config.backbone, config.layers, config.weights)  # fail here, not in every worker
    identity = json.loads(
        json.dumps(
            {"root": str(root_path), "config": asdict(config), "workers_per_category": resources.workers_per_category}
        )
    )
    run_id, storage = _claim_out_dir(out_path, identity, storage_path, resume, overwrite)

    complete = {c: r for c in categories if (r := _complete_result(out_path, c)) is not None}
    for category in complete:
        progress(f"[{category}] already complete in {out_path / category}, skipped")
    pending = [c for c in categories if c not in complete]
    results: dict[str, CategoryResult] = dict(complete)
    if pending:
        job = _Job(root=str(root_path), config=config, resources=resources, storage_path=storage, run_id=run_id)
        results.update(_run_trials(pending, job, out_path, progress, address))
    ordered = [results[c] for c in categories]
    progress(format_summary(ordered))
    return ordered


def _run_trials(
    categories: list[str], job: _Job, out_dir: Path, progress: Progress, address: str | None
) -> dict[str, CategoryResult]:
    init_ray(address)
    capacity = cluster_capacity()
    res = job.resources.sized_for(capacity, len(categories))
    job = replace(job, resources=res)
    concurrency = _concurrency(capacity, res.workers_per_category, res.cpus_per_worker, res.gpus_per_worker)
    progress(
        f"training {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}, "
        f"{min(concurrency, len(categories))} at a time, {res.workers_per_category} worker(s) each with "
        f"{res.cpus_per_worker:g} CPUs; run {job.run_id}, Ray Train state in {job.storage_path}"
    )
    tracker = Tracker(job, out_dir, progress)
    tracker.total = len(categories)
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
    missing = [c for c in categories if c not in tracker.results]
    for category in missing:  # Tune stopped before this trial ended (e.g. Ctrl+C)
        tracker.finish(category, {"category_error": "interrupted (run again with --resume to continue)"})
    return tracker.results
