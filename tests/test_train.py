"""`stfpm-ray train` on Ray (Tune over categories, one TorchTrainer each): concurrent categories, a failed
category beside a sound one, determinism, a killed worker resuming, output folders refused or resumed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stfpm_ray import cli
from stfpm_ray.core.checkpoint import load_checkpoint, read_meta, validate_checkpoint
from stfpm_ray.core.fit import TrainConfig, fit_category
from stfpm_ray.data import mvtec
from stfpm_ray.data.images import load_image
from stfpm_ray.evaluate.metrics import image_auroc
from stfpm_ray.ray import train_worker, trainer
from stfpm_ray.ray.resources import TrainResources
from stfpm_ray.ray.trainer import Tracker
from stfpm_ray.store.checkpoint_folder import RUN_FILE
from stfpm_ray.workflows.train import train_categories

# The synthetic "tiles" defects are too small to separate at 64 px; "grain" and "weave" are not.
PAIR = ["grain", "weave"]
CONFIG = TrainConfig(weights="offline", image_size=64, batch_size=8, epochs=20, seed=3)
TINY = ["--weights", "offline", "--image-size", "64", "--batch-size", "8", "--epochs", "1"]


@pytest.fixture(scope="module")
def pair_run(ray_session, synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    lines: list[str] = []
    results = train_categories(synth_root, PAIR, out, CONFIG, TrainResources(cpus_per_worker=1), progress=lines.append)
    return out, results, lines


def _scores(folder: Path, root: Path, category: str) -> tuple[np.ndarray, np.ndarray]:
    model, meta = load_checkpoint(folder)
    samples = mvtec.test_samples(root, category)
    images = torch.from_numpy(np.stack([load_image(s.path, meta.image_size) for s in samples])).permute(0, 3, 1, 2)
    return np.array([s.label for s in samples]), model.predict(images.contiguous())[1].numpy()


def test_categories_train_concurrently_into_loadable_checkpoints_that_separate_defects(pair_run, synth_root):
    out, results, lines = pair_run
    assert [r.category for r in results] == PAIR
    assert all(r.ok and r.status == "trained" and r.epochs == CONFIG.epochs for r in results), results
    first, second = results
    assert first.started_at < second.finished_at and second.started_at < first.finished_at, "no overlap"
    for result in results:
        assert 1 <= result.best_epoch <= CONFIG.epochs and result.threshold > 0 and result.images_per_s > 0
        folder = Path(result.checkpoint_dir)
        assert folder == out / result.category
        assert sorted(p.name for p in folder.iterdir()) == ["stfpm.json", "student.safetensors"]
        labels, scores = _scores(folder, synth_root, result.category)
        assert image_auroc(labels, scores) >= 0.9, result.category
    assert any(
        re.match(rf"\[grain\] epoch 3/{CONFIG.epochs} train_loss=\S+ val_loss=\S+ best=\S+ \S+ img/s", line)
        for line in lines
    )
    assert "best val loss" in lines[-1] and lines[-1].count("trained") == 2
    # Ray Train run state lives in a '_'-prefixed folder, so readers of CKPT_DIR skip it.
    assert sorted(p.name for p in out.iterdir()) == ["_ray", RUN_FILE, *PAIR]


def test_failed_category_does_not_stop_the_other_and_training_is_deterministic(pair_run, synth_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(synth_root / "grain", root / "grain")
    (root / "broken" / "train" / "good").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (root / "broken" / "train" / "good" / name).write_bytes(b"not an image")
    out = tmp_path / "ckpt"
    args = [
        "train",
        "--data",
        str(root),
        "--out",
        str(out),
        "--weights",
        "offline",
        "--image-size",
        "64",
        "--batch-size",
        "8",
        "--epochs",
        str(CONFIG.epochs),
        "--seed",
        str(CONFIG.seed),
    ]
    assert cli.main(args) == 1
    printed = capsys.readouterr().out
    assert re.search(r"broken .*failed: DatasetError: none of 1 images could be read", printed), printed
    assert (out / "grain" / "stfpm.json").is_file() and not (out / "broken").exists()
    # Same seed, data and machine: the same model as the grain of the concurrent run, whose worker reserved
    # one CPU where this one reserved two (the recipe's threads do the arithmetic either way).
    again = json.loads((out / "grain" / "stfpm.json").read_text())
    before = next(r for r in pair_run[1] if r.category == "grain")
    assert again["training"]["best_val_loss"] == before.best_val_loss and again["threshold"] == before.threshold

    # --resume with other settings is refused; with the same ones complete categories are kept as they are.
    assert cli.main([*args, "--lr", "0.1", "--resume"]) == 2
    assert "lr" in capsys.readouterr().err
    written = (out / "grain" / "student.safetensors").stat().st_mtime_ns
    assert cli.main([*args, "--categories", "grain", "--resume"]) == 0
    assert "[grain] already complete" in capsys.readouterr().out
    assert (out / "grain" / "student.safetensors").stat().st_mtime_ns == written


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes started by this test process's Ray instance (not other sessions')."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            pid, ancestors = int(entry.name), set()
            parent = pid
            while parent > 1 and len(ancestors) < 64:
                parent = int((Path("/proc") / str(parent) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                ancestors.add(parent)
        except (OSError, ValueError, IndexError):
            continue
        if b"RayTrainWorker" in cmdline and os.getpid() in ancestors:
            found.append(pid)
    return found


def test_killed_worker_resumes_from_its_last_checkpoint(ray_session, synth_root, tmp_path):
    config = TrainConfig(weights="offline", image_size=64, batch_size=8, epochs=60, seed=0)
    killed: list[int] = []
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        match = re.match(r"\[grain\] epoch (\d+)/", line)
        if match and int(match.group(1)) >= 2 and not killed:
            killed.extend(_train_worker_pids())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    # one CPU per worker, so that the plain loop below can reproduce it with one thread
    [result] = train_categories(
        synth_root, ["grain"], tmp_path / "ckpt", config, TrainResources(cpus_per_worker=1), progress=progress
    )
    assert len(killed) == 1, lines
    assert result.ok and result.epochs == 60, result
    resumed = [int(m.group(1)) for line in lines if (m := re.search(r"resumed .* after epoch (\d+)", line))]
    assert len(resumed) == 1 and 2 <= resumed[0] < 60, lines
    epochs = [int(m.group(1)) for line in lines if (m := re.match(r"\[grain\] epoch (\d+)/", line))]
    assert epochs.count(1) == 1 and epochs[-1] == 60, epochs  # continued, never restarted from 0
    model, meta = load_checkpoint(result.checkpoint_dir)
    assert meta.training["epochs"] == 60 and meta.threshold == pytest.approx(result.threshold)
    # Resuming restores optimizer, best-epoch state and batch order: the same student as the plain loop
    # trains in this process without interruption, bit for bit (Ray Train or not, killed or not).
    plain_model, plain, _ = fit_category(synth_root, "grain", config)
    assert result.best_val_loss == plain.training["best_val_loss"] and meta.threshold == plain.threshold
    assert all(
        torch.equal(value, plain_model.student.state_dict()[key]) for key, value in model.student.state_dict().items()
    )


def test_resumable_checkpoints_are_reported_at_most_every_interval(monkeypatch):
    """Reports every 2 s carry a resumable checkpoint (tens of MB) only every CHECKPOINT_INTERVAL_S, the first
    report always, so that a crash early in training still resumes (the test above) without uploading one
    every report."""
    clock = {"now": 0.0}
    monkeypatch.setattr(train_worker, "time", SimpleNamespace(monotonic=lambda: clock["now"], time=time.time))
    monkeypatch.setattr(train_worker.ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0))
    reports: list[tuple[float, int, list[str]]] = []

    def report(metrics: dict, checkpoint: object = None) -> None:
        files = sorted(p.name for p in Path(checkpoint.path).iterdir()) if checkpoint is not None else []
        reports.append((clock["now"], metrics["epoch"], files))

    monkeypatch.setattr(train_worker.ray.train, "report", report)
    fitter = SimpleNamespace(epoch=0, config=SimpleNamespace(epochs=200), started_at=0.0)
    fitter.state_dict = lambda: {"epoch": fitter.epoch}
    reporter = train_worker._Reporter(torch.device("cpu"), None)
    for epoch in range(1, 200):  # one epoch a second
        clock["now"], fitter.epoch = float(epoch), epoch
        reporter(fitter, {"category": "grain", "epoch": epoch})
    saved = [at for at, _, files in reports if files]
    assert len(reports) >= 90 and reports[0][2] == [train_worker.STATE_FILE]
    assert all(b - a >= train_worker.CHECKPOINT_INTERVAL_S for a, b in zip(saved, saved[1:]))
    assert len(saved) == 1 + int((199 - saved[0]) // train_worker.CHECKPOINT_INTERVAL_S) >= 6


def test_epochs_repeated_after_a_restart_are_printed_once():
    """After a crash the workers repeat the epochs since their last resumable checkpoint (identically): the
    driver says where training resumed and prints each epoch once."""
    lines: list[str] = []
    tracker = Tracker(None, Path("unused"), lines.append, 1)
    trial = SimpleNamespace(config={"category": "grain"})

    def epochs(*numbers: int) -> tuple:
        return tuple({"epoch": n, "epochs": 9, "train_loss": 1.0, "val_loss": 1.0, "best_val_loss": 1.0,
                      "best_epoch": n, "images_per_s": 10.0} for n in numbers)  # fmt: skip

    for result in ({"history": epochs(1, 2)}, {"history": epochs(3, 4)}, {"history": epochs(3), "resumed_from": 2}):
        tracker.on_trial_result(0, [], trial, result)
    tracker.on_trial_result(0, [], trial, {"history": epochs(4, 5)})
    printed = [int(m.group(1)) for line in lines if (m := re.match(r"\[grain\] epoch (\d+)/9", line))]
    assert printed == [1, 2, 3, 4, 5] and any("resumed from its checkpoint after epoch 2" in line for line in lines)


def test_the_eta_counts_epochs_not_the_start_up(monkeypatch):
    """Start-up (workers, decoding, the first epoch's teacher cache) took 90 s, then epochs take 10 s: the ETA
    after epoch 2 of 9 is 7 x 10 s, not 7 x (110 s / 2)."""
    now = [0.0]
    monkeypatch.setattr(trainer.time, "time", lambda: now[0])
    lines: list[str] = []
    tracker = Tracker(None, Path("unused"), lines.append, 1)
    trial = SimpleNamespace(config={"category": "grain"})
    tracker.on_trial_start(0, [], trial)

    def epoch(n: int) -> dict:
        return {"epoch": n, "epochs": 9, "train_loss": 1.0, "val_loss": 1.0, "best_val_loss": 1.0, "best_epoch": n,
                "images_per_s": 10.0}  # fmt: skip

    now[0] = 100.0
    tracker.on_trial_result(0, [], trial, {"history": (epoch(1),)})
    now[0] = 110.0
    tracker.on_trial_result(0, [], trial, {"history": (epoch(2),)})
    assert lines[-1].startswith("[grain] epoch 2/9") and lines[-1].endswith("ETA 1m10s"), lines
    now[0] = 140.0  # one report brings three epochs (fast epochs, reports every 2 s): 10 s each, all arriving now
    tracker.on_trial_result(0, [], trial, {"history": (epoch(3), epoch(4), epoch(5))})
    assert [line.rsplit("ETA ", 1)[1] for line in lines[-3:]] == ["1m00s", "0m50s", "0m40s"], lines


def test_refuses_a_non_empty_output_folder_without_resume_or_overwrite(synth_root, tmp_path, capsys):
    out = tmp_path / "ckpt"
    (out / "grain").mkdir(parents=True)
    (out / RUN_FILE).write_text(json.dumps({"run_id": "x", "storage_path": str(out / "_ray"), "identity": {}}))
    base = ["train", "--data", str(synth_root), "--out", str(out), *TINY]
    assert cli.main(base) == 2
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects the two together
        cli.main([*base, "--resume", "--overwrite"])
    capsys.readouterr()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["train", "--data", str(synth_root), "--out", str(foreign), *TINY, "--overwrite"]) == 2
    assert "not written by" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_reverse_student_trains_and_scores_through_the_cli(ray_session, synth_root, tmp_path):
    from conftest import read_scores

    ckpt, scores = tmp_path / "ckpt", tmp_path / "scores"
    argv = ["train", "--data", str(synth_root), "--categories", "grain", "--out", str(ckpt), *TINY]
    assert cli.main([*argv, "--student", "reverse", "--epochs", "2"]) == 0
    meta = read_meta(ckpt / "grain")
    assert (meta.student, meta.training["lr"], meta.training["epochs"]) == ("reverse", 0.005, 2)
    assert (
        cli.main(["score", "--checkpoints", str(ckpt), "--input", str(synth_root / "grain"), "--out", str(scores)]) == 0
    )
    frame = read_scores(scores)
    assert len(frame) == len(mvtec.test_samples(synth_root, "grain")) and (frame.status == "ok").all()
    assert set(frame.model_id) == {meta.model_id}


def test_two_workers_per_category_train_one_student_data_parallel(ray_session, synth_root, tmp_path):
    """DDP over two gloo workers on a category whose 13 training images split unevenly (7 and 6): with 2 images
    per rank and step, striding alone would give rank 0 four steps and rank 1 three, and the run would hang in
    the gradient all-reduce; the padded order gives both four. Every reverse-student parameter gets a
    gradient, so DDP runs without searching for unused ones (the registry's entry says so)."""
    out = tmp_path / "ckpt"
    argv = ["train", "--data", str(synth_root), "--categories", "grain", "--out", str(out), *TINY]
    parallel = ["--workers-per-category", "2", "--cpus-per-worker", "1", "--max-failures", "0"]
    assert cli.main([*argv, *parallel, "--epochs", "2", "--batch-size", "4"]) == 0
    meta = read_meta(out / "grain")
    assert meta.training["workers"] == 2 and meta.student == "reverse" and meta.training["train_images"] == 13
    assert meta.training["epochs"] == 2 and meta.training["best_epoch"] >= 1
    assert validate_checkpoint(out / "grain").model_id == meta.model_id
