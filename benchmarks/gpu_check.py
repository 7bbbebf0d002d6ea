"""One accelerator node, under 8 minutes: what a user's GPU run does, step by step, in one table.

Run through ``benchmarks/gpu_check.sh``; ``--cpu`` is a dry run at small sizes on the CPU, which CI runs to the
end so that the first call on a GPU does not fail on a typo. The steps call the code a run calls; Ray is
optional (a GPU image often lacks it), and where it is importable its steps run as well:

1. training: ``fit_category`` on the device, as a Train worker runs it (teacher features cached): images/s
   of the epoch loop, wall time with decoding, peak GPU memory;
2. quality: ``precision_check.compare`` on the test images: image and pixel AUROC in fp32 and bf16, and how
   far bf16 moves the scores;
3. decode-only ceiling: ``decode_block`` (the pipeline's decode task) on the planned blocks of ``--images``
   files (test images repeated), one process per CPU;
4. forward-only ceiling: ``STFPM.predict`` on decoded pinned batches, fp32 and bf16, no map encoding;
5. the actor's scoring path: ``ScoringModels`` (``load_scoring_model``: the networks rewritten for
   inference) and ``score_block`` on decoded blocks of ``--batch-size`` rows, ``--precision auto``;
6. runtimes: what ``--runtime auto`` picks for GPU actors (PyTorch, the one runtime here with a GPU path),
   and, where onnxruntime or OpenVINO is installed, the exported graph against PyTorch on the node's CPUs
   (``measure_rates``, what ``auto`` measures for CPU actors), so a mixed cluster's CPU nodes are measured too;
7. core end to end: a DataLoader decoding in one process per CPU into ``score_batch``, one timed pass
   (worker start-up included: a warm-up pass would leave prefetched batches decoded before the clock);
8. with Ray: the Ray Data pipeline (files -> Parquet) and ``stfpm-ray benchmark`` (train, score, evaluate).

Target: end-to-end scoring >= 0.8x the decode-only ceiling of the node.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from precision_check import compare  # the sibling script (run as benchmarks/gpu_check.py)

from stfpm_ray.core.checkpoint import CheckpointMeta, save_checkpoint
from stfpm_ray.core.export import export_onnx, installed
from stfpm_ray.core.fit import TrainConfig, fit_category
from stfpm_ray.core.model import STFPM
from stfpm_ray.core.runtimes import EXPORTED, choose_runtime, measure_rates
from stfpm_ray.core.score import DEFAULT_MAP_SIZE as MAP_SIZE
from stfpm_ray.core.score import ScoreSettings, ScoringModels, cpu_chunk, score_batch, score_block
from stfpm_ray.data.images import ImageDecodeError, load_image
from stfpm_ray.data.listing import list_images
from stfpm_ray.data.mvtec import test_samples
from stfpm_ray.data.plan import decode_block, plan
from stfpm_ray.data.synth import generate_dataset
from stfpm_ray.progress import quiet

# Sizes of a GPU check (one H100 with 16 CPUs: under 8 minutes) and of the CPU dry run (about a minute).
SIZES = {
    "gpu": {"epochs": 50, "image_size": 256, "images": 4000, "batch_size": 128},
    "cpu": {"epochs": 1, "image_size": 64, "images": 48, "batch_size": 16},
}
# The generated category when no --data is given: side, train and test images.
SYNTH = {"gpu": (768, 200, 60), "cpu": (96, 12, 8)}


class Table:
    """The figures, printed as they come and at the end as one Markdown table the README can quote."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, step: str, figure: str, details: str = "") -> None:
        print(f"  {step}: {figure}" + (f" ({details})" if details else ""), flush=True)
        self.rows.append((step, figure, details))

    def print(self, title: str) -> None:
        print(f"\n{title}\n\n| step | figure | details |\n|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


class Files(torch.utils.data.Dataset):
    """Decoded images of a list of files, for DataLoader workers."""

    def __init__(self, paths: list[Path], size: tuple[int, int]) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            return torch.from_numpy(np.array(load_image(self.paths[index], self.size))).permute(2, 0, 1)
        except ImageDecodeError:
            return torch.zeros(3, *self.size, dtype=torch.uint8)


def timed(device: str, run: Callable[[], object]) -> tuple[float, str]:
    """Seconds ``run`` takes (the GPU synchronised) and its peak GPU memory in words ('' on a CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return seconds, f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else ""


def details(*parts: str) -> str:
    return "; ".join(part for part in parts if part)


def train(args: argparse.Namespace, root: Path, category: str, folder: Path, table: Table) -> tuple[STFPM, Any]:
    """Fit the category on the device; returns the model and its saved checkpoint's metadata."""
    config = TrainConfig(image_size=args.image_size, epochs=args.epochs, weights="offline")
    fitted: dict[str, Any] = {}
    rates: list[float] = []

    def fit() -> None:
        def hook(fitter: object, metrics: dict[str, Any]) -> None:
            rates.append(metrics["images_per_s"])

        fitted["fit"] = fit_category(root, category, config, device=args.device, on_epoch=hook)

    seconds, peak = timed(args.device, fit)
    model, meta, _ = fitted["fit"]
    table.add(
        "training",
        f"{float(np.median(rates)):.0f} images/s",
        details(
            f"median epoch; {config.student} student, {args.epochs} epochs of {meta.training['train_images']} "
            f"images, batch {config.batch_size}",
            f"wall {seconds:.0f} s with decoding, teacher cache and validation",
            peak,
        ),
    )
    return model, save_checkpoint(folder, model.student, meta, model.memory_bank)


def quality(model: STFPM, meta: CheckpointMeta, root: Path, args: argparse.Namespace, table: Table) -> None:
    rows = compare(model, root, meta.category, meta.input_size, args.batch_size, args.device)  # rewrites the model
    fp32, bf16 = rows["fp32 rewritten"], rows["bf16 rewritten"]
    table.add(
        "quality, fp32 vs bf16",
        f"image AUROC {fp32['image_auroc']:.4f} vs {bf16['image_auroc']:.4f}, "
        f"pixel AUROC {fp32['pixel_auroc']:.4f} vs {bf16['pixel_auroc']:.4f}",
        f"bf16 moves scores by up to {bf16['max_dev']:.1e} relative (mean {bf16['mean_dev']:.1e}); "
        f"the inference rewrite by {fp32['max_dev']:.1e}",
    )


def decode(
    paths: list[Path], work: Path, category: str, meta: CheckpointMeta, args, table: Table
) -> tuple[list[pa.Table], float]:
    """The planned blocks of an archive of ``paths``, decoded as the pipeline's decode tasks do, and the rate."""
    archive = work / "archive"
    archive.mkdir()
    for i, path in enumerate(paths):  # distinct files: a listing folds symlinks into their target
        try:
            os.link(path, archive / f"{i:06d}{path.suffix}")
        except OSError:  # another filesystem
            shutil.copyfile(path, archive / f"{i:06d}{path.suffix}")
    listing = list_images([str(archive)])
    planned = plan(listing, {category: meta}, {}, category, None, args.batch_size, split="all")
    decoded: list[pa.Table] = []
    with Pool(args.cpus) as pool:
        pool.map(abs, range(args.cpus))  # start the processes before the clock
        work_items = [(block, listing.sources) for block in planned.blocks]
        seconds, _ = timed("cpu", lambda: decoded.extend(pool.starmap(decode_block, work_items)))
    rate = len(paths) / seconds
    table.add(
        "decode-only ceiling",
        f"{rate:.1f} images/s",
        f"decode_block on {len(planned.blocks)} planned blocks, {args.cpus} processes",
    )
    return decoded, rate


def forward_only(model: STFPM, meta: CheckpointMeta, decoded: list[pa.Table], args, table: Table) -> None:
    (height, width), device = meta.input_size, args.device
    batches = [
        torch.from_numpy(np.stack([np.frombuffer(p, np.uint8).reshape(height, width, 3) for p in block["pixels"]]))
        for block in (b.to_pydict() for b in decoded)
    ]
    batches = [b.permute(0, 3, 1, 2).pin_memory() if device == "cuda" else b.permute(0, 3, 1, 2) for b in batches]
    count = sum(len(b) for b in batches)
    for precision in ("fp32", "bf16"):

        def run(precision: str = precision) -> None:
            for batch in batches:
                model.predict(batch.to(device, non_blocking=True), precision)

        with torch.inference_mode():
            model.predict(batches[0].to(device), precision)  # kernels chosen before the clock
            seconds, peak = timed(device, run)
        table.add(f"forward-only ceiling, {precision}", f"{count / seconds:.1f} images/s", peak)


def actor_path(folder: Path, meta: CheckpointMeta, decoded: list[pa.Table], args, table: Table) -> None:
    """What one scoring actor does per batch: the loaded, rewritten model and ``score_block``."""
    models = ScoringModels({meta.category: (str(folder), meta)}, args.device)
    models(meta.category)  # load_scoring_model, once per actor
    settings = ScoreSettings(map_size=MAP_SIZE, precision="auto", chunk=cpu_chunk(args.device, args.threads))
    with torch.inference_mode():
        score_block(decoded[0], models, settings, "warm-up")
        seconds, peak = timed(args.device, lambda: [score_block(b, models, settings, "gpu-check") for b in decoded])
    table.add(
        f"actor scoring path, batch {args.batch_size}",
        f"{sum(b.num_rows for b in decoded) / seconds:.1f} images/s",
        details("score_block: forward, map, PNG, decision", "precision auto", peak),
    )


def runtimes(folder: Path, meta: CheckpointMeta, args: argparse.Namespace, table: Table) -> None:
    checkpoints = {meta.category: (str(folder), meta)}
    picked = choose_runtime("auto", args.device, {meta.category: "fp32"}, checkpoints, args.threads)
    table.add(f"--runtime auto, {args.device.upper()} actors", picked.runtime, picked.reason)
    others = [name for name in EXPORTED if installed(name)]
    if not others:
        table.add("CPU forward by runtime", "skipped", "neither onnxruntime nor openvino is installed")
        return
    model, _ = ScoringModels(checkpoints)(meta.category)  # on the CPU, as a CPU actor loads it
    threads = os.cpu_count() or 1
    rates = measure_rates(model, export_onnx(model, meta.input_size), meta.input_size, threads, others)
    table.add(
        "CPU forward by runtime",
        ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()) + " images/s",
        f"the probe auto measures: 8 images, {threads} threads",
    )


def core_end_to_end(model: STFPM, meta: CheckpointMeta, paths: list[Path], args, table: Table) -> float:
    settings = ScoreSettings(map_size=MAP_SIZE, precision="auto")
    loader = torch.utils.data.DataLoader(
        Files(paths, meta.input_size),
        batch_size=args.batch_size,
        num_workers=max(1, args.cpus - 1),
        pin_memory=args.device == "cuda",
        prefetch_factor=4,
    )

    def run() -> None:
        for batch in loader:
            score_batch(model, meta, batch.to(args.device, non_blocking=True), settings)

    with torch.inference_mode():
        seconds, peak = timed(args.device, run)
    rate = len(paths) / seconds
    table.add("core end to end", f"{rate:.1f} images/s", details("DataLoader decode into score_batch, one pass", peak))
    return rate


def with_ray(work: Path, root: Path, category: str, args: argparse.Namespace, table: Table) -> float:
    """The Ray steps' images/s, 0 where Ray cannot be imported or a step fails (the core's figures are still
    printed; the failure is shown)."""
    try:
        from stfpm_ray import cli
        from stfpm_ray.ray.pipeline import ScoringOptions
        from stfpm_ray.ray.session import init_ray
        from stfpm_ray.workflows.score import score_images
    except ImportError as exc:
        table.add("Ray pipeline and stfpm-ray benchmark", "skipped", f"Ray cannot be imported here: {exc}")
        return 0.0
    try:
        init_ray()  # Ray's start-up is not scoring
        gpus = None if args.device == "cuda" else 0.0  # auto: the GPU where there is one
        options = ScoringOptions(batch_size=args.batch_size, gpus_per_actor=gpus)
        archive = work / "archive"
        seconds, _ = timed(
            args.device,
            lambda: score_images(work / "ckpt", str(archive), work / "scores", options, category, progress=quiet),
        )
        rate = len(list(archive.iterdir())) / seconds
        table.add("Ray pipeline", f"{rate:.1f} images/s", "files -> decode tasks -> scoring actors -> Parquet")
        benchmark(root, category, work / "benchmark", args, table, cli.main)
        return rate
    except Exception:  # noqa: BLE001 - an optional step: the table of the others still matters
        traceback.print_exc()
        table.add("Ray steps", "failed", "see the traceback above")
        return 0.0


def benchmark(root: Path, category: str, out: Path, args, table: Table, main: Callable[[list[str]], int]) -> None:
    """``stfpm-ray benchmark`` on the category, as a user runs it (GPUs auto), in this process's Ray."""
    argv = ["benchmark", "--data", str(root), "--categories", category, "--out", str(out), "-q", "--weights", "offline"]
    argv += ["--epochs", str(args.epochs), "--image-size", str(args.image_size)]
    argv += ["--score-batch-size", str(args.batch_size)]
    argv += ["--gpus-per-worker", "0", "--gpus-per-actor", "0"] if args.device == "cpu" else []
    started = time.perf_counter()
    status = main(argv)
    table.add(
        "stfpm-ray benchmark",
        f"exit status {status}, {time.perf_counter() - started:.0f} s",
        f"train {args.epochs} epochs, score and evaluate {category} through Ray",
    )


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="MVTec-layout root (default: generate one synthetic category)")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU at small sizes (what CI runs)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--images", type=int, help="files to score (test images repeated)")
    parser.add_argument("--batch-size", type=int, help="scoring batch size")
    args = parser.parse_args()
    mode = "cpu" if args.cpu or not torch.cuda.is_available() else "gpu"
    for name, value in SIZES[mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.mode, args.device = mode, "cpu" if mode == "cpu" else "cuda"
    args.cpus = os.cpu_count() or 1
    args.threads = torch.get_num_threads()
    return args


def stop_at_time_limit(signum: int, frame: object) -> None:
    """gpu_check.sh's ``timeout`` sends SIGTERM: stop the step, and print the table of the steps done."""
    raise SystemExit(f"stopped by signal {signum} (the time limit)")


def run_steps(args: argparse.Namespace, work: Path, root: Path, category: str, table: Table) -> None:
    torch.backends.cudnn.benchmark = args.device == "cuda"
    model, meta = train(args, root, category, work / "ckpt" / category, table)
    quality(model, meta, root, args, table)
    sources = [Path(s.path).resolve() for s in test_samples(root, category)]
    paths = [sources[i % len(sources)] for i in range(args.images)]
    decoded, decode_rate = decode(paths, work, category, meta, args, table)
    forward_only(model, meta, decoded, args, table)
    actor_path(work / "ckpt" / category, meta, decoded, args, table)
    runtimes(work / "ckpt" / category, meta, args, table)
    best = max(core_end_to_end(model, meta, paths, args, table), with_ray(work, root, category, args, table))
    table.add("end to end / decode-only ceiling", f"{best / decode_rate:.2f}", "target >= 0.8")


def main() -> None:
    args = arguments()
    signal.signal(signal.SIGTERM, stop_at_time_limit)
    work, table = Path(tempfile.mkdtemp(prefix="gpu-check-")), Table()
    try:
        root, category = (Path(args.data), args.category) if args.data else (work / "data", None)
        if category is None:
            size, n_train, n_test = SYNTH[args.mode]
            category = generate_dataset(root, categories=1, size=size, n_train=n_train, n_test=n_test, seed=0)[0]
        name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (dry run)"
        title = (
            f"gpu_check on {name}, {args.cpus} CPUs, torch {torch.__version__}, "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {category} at {args.image_size} px, "
            f"{args.images} files scored in batches of {args.batch_size}"
        )
        print(title, flush=True)
        try:
            run_steps(args, work, root, category, table)
        finally:  # the steps done so far, also when one failed or the time ran out
            table.print(title)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
