"""Images/s of the bare forward (decoded uint8 images in, scores and full-size maps out): PyTorch against the
exported graph in onnxruntime and OpenVINO, same images, same machine, one run; with each row's image AUROC on
those images, so a faster precision shows what it costs.

Rows, as ratios to the first:

* ``torch fp32, chunks``: the scoring model as the actors run it (``load_scoring_model``, BatchNorm folded,
  channels_last; ``score_batch`` splits a batch into chunks of ``cpu_chunk`` images: 4 per thread);
* ``torch fp32, whole batch`` and ``torch bf16, chunks`` (``--precision bf16``; fast only on CPUs with
  AVX512-BF16 or AMX);
* ``onnxruntime`` and ``openvino``, whole batch and chunks: the exported graph as ``--runtime`` runs it
  (:data:`stfpm_ray.core.exported.SCORERS`: fp32, as many intra-op threads as torch has);
* ``openvino bf16``: the same graph compiled with OpenVINO's bf16 inference hint (not offered by ``--runtime``:
  the threshold was set on fp32 scores).

Each round times every row once, in turn, so that load from other processes on a shared machine falls on all
rows alike; the best round of each row is reported.

    python benchmarks/export_speed.py runs/real256s/checkpoints/bottle --data ../shared/data/mvtec --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from stfpm_ray.core.export import export_onnx, installed
from stfpm_ray.core.exported import SCORERS, OpenVinoScorer
from stfpm_ray.core.score import cpu_chunk, load_scoring_model
from stfpm_ray.data.images import load_image
from stfpm_ray.data.mvtec import test_samples
from stfpm_ray.evaluate.metrics import image_auroc


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
    parser.add_argument("--images", type=int, default=0, help="test images (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="threads of every runtime (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_scoring_model(str(args.checkpoint))
    samples = test_samples(args.data, meta.category)[: args.images or None]
    labels = np.array([s.label for s in samples])
    images = torch.from_numpy(np.stack([load_image(s.path, meta.input_size) for s in samples])).permute(0, 3, 1, 2)
    threads = torch.get_num_threads()
    graph = export_onnx(model, meta.input_size)
    chunk, batch = cpu_chunk("cpu", threads), args.batch_size
    rows = {
        f"torch fp32, chunks of {chunk}": (lambda b: model.predict(b, "fp32"), chunk),
        f"torch fp32, whole batch of {batch}": (lambda b: model.predict(b, "fp32"), batch),
        f"torch bf16, chunks of {chunk}": (lambda b: model.predict(b, "bf16"), chunk),
    }
    for name in (name for name in SCORERS if installed(name)):
        scorer = SCORERS[name](graph, threads)
        rows[f"{name}, whole batch of {batch}"] = (scorer.predict, batch)
        rows[f"{name}, chunks of {chunk}"] = (scorer.predict, chunk)
    if installed("openvino"):
        bf16 = OpenVinoScorer(graph, threads, precision="bf16")
        rows[f"openvino bf16, whole batch of {batch}"] = (partial(bf16.predict, precision="bf16"), batch)
    aurocs = {}
    for name, (forward, size) in rows.items():  # warm-up (first-call allocations, kernel choices), AUROC
        scores = [forward(images[i : i + size])[1] for i in range(0, len(images), size)]
        aurocs[name] = image_auroc(labels, torch.cat([torch.as_tensor(s).float() for s in scores]).numpy())
    best = dict.fromkeys(rows, 0.0)
    for _ in range(args.rounds):
        for name, (forward, size) in rows.items():
            best[name] = max(best[name], rate(forward, images, batch, size))
    versions = ", ".join(
        f"{name} {version(name)}" for name in ("torch", *SCORERS) if name == "torch" or installed(name)
    )
    print(
        f"{meta.category}: {len(images)} test images at {meta.image_size} px, batch {batch}, {threads} threads; "
        f"{versions}; best of {args.rounds} rounds"
    )
    reference = next(iter(best.values()))
    for name, value in best.items():
        print(f"{name:<34} {value:>8.1f} images/s  {value / reference:>5.2f}x   image AUROC {aurocs[name]:.4f}")


if __name__ == "__main__":
    main()
