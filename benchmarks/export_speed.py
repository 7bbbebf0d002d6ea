"""Images/s of the bare forward (decoded uint8 images in, scores and full-size maps out): PyTorch fp32 vs the
exported graph on onnxruntime's CPU execution provider, same images, same machine, one run.

Rows, as ratios to the first:

* ``torch fp32, chunks``: the scoring model as the actors run it (``load_scoring_model``, BatchNorm folded,
  channels_last; ``score_batch`` splits a batch into chunks of ``cpu_chunk`` images: 4 per thread);
* ``torch fp32, whole batch``: the same model, one pass per batch;
* ``onnxruntime, whole batch`` and ``onnxruntime, chunks``: the exported graph (every graph optimisation on),
  as many intra-op threads as torch has.

Each round times every row once, in turn, so that load from other processes on a shared machine falls on all
rows alike; the best round of each row is reported.

    python benchmarks/export_speed.py /work/dev/runs/real256/checkpoints/bottle --data ../shared/data/mvtec
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from stfpm_ray.core.exported import onnx_session, predict_onnx
from stfpm_ray.core.score import cpu_chunk, load_scoring_model
from stfpm_ray.data.images import load_image
from stfpm_ray.data.mvtec import test_samples
from stfpm_ray.workflows.export import export_models


def rate(forward: Callable[[torch.Tensor], object], images: torch.Tensor, batch: int, chunk: int) -> float:
    """Images/s of ``forward`` over ``images``, in batches of ``batch`` split into chunks of ``chunk``."""
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        block = images[start : start + batch]
        for offset in range(0, len(block), chunk):
            forward(block[offset : offset + chunk])
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="one category's checkpoint folder")
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout root with the category's test images")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: torch's, one per core)")
    parser.add_argument("--exported", type=Path, help="EXPORT_DIR already holding the category (default: export now)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_scoring_model(str(args.checkpoint))
    samples = test_samples(args.data, meta.category)[: args.images]
    images = torch.from_numpy(np.stack([load_image(s.path, meta.image_size) for s in samples])).permute(0, 3, 1, 2)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as scratch:
        if args.exported is None:
            export_models(args.checkpoint, scratch, [meta.category], progress=print)
        session = onnx_session(str((args.exported or Path(scratch)) / f"{meta.category}.onnx"), threads)
    chunk, batch = cpu_chunk("cpu", threads), args.batch_size
    rows = {
        f"torch fp32, chunks of {chunk}": (lambda b: model.predict(b, "fp32"), chunk),
        f"torch fp32, whole batch of {batch}": (lambda b: model.predict(b, "fp32"), batch),
        f"onnxruntime, whole batch of {batch}": (lambda b: predict_onnx(session, b.numpy()), batch),
        f"onnxruntime, chunks of {chunk}": (lambda b: predict_onnx(session, b.numpy()), chunk),
    }
    for forward, size in rows.values():  # warm-up: first-call allocations and kernel choices
        forward(images[:size])
    best = dict.fromkeys(rows, 0.0)
    for _ in range(args.rounds):
        for name, (forward, size) in rows.items():
            best[name] = max(best[name], rate(forward, images, batch, size))
    print(
        f"{meta.category}: {len(images)} test images at {meta.image_size} px, batch {batch}, {threads} threads; "
        f"torch {torch.__version__}, onnxruntime {version('onnxruntime')}; best of {args.rounds} rounds"
    )
    reference = next(iter(best.values()))
    for name, value in best.items():
        print(f"{name:<34} {value:>8.1f} images/s  {value / reference:>5.2f}x")


if __name__ == "__main__":
    main()
