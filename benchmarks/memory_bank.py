"""The memory bank on trained students: the student's map, the memory's, and their average, side by side.

The memory (``stfpm_ray.core.memory_bank``) is built after training from the teacher alone, so it can be added
to students trained before it existed, exactly as training builds it: the same training split, decoded images,
seed, coreset and held-out scales. For each finished ``stfpm-ray benchmark`` folder this prints image and pixel
AUROC of the three maps, false alarms and recall at the deployed threshold (the student's as trained; with the
memory, calibrated on the combined held-out scores as training calibrates it), and the time the memory costs
per scored image, so the gain can be checked on every category and seed without retraining.

    python benchmarks/memory_bank.py runs/e200/screw_s0 runs/e200/screw_s1 runs/e200/screw_s2 runs/e200/elpv_s0

``--neighbours 1`` gives the memory as it was before 2026-12-08 (the nearest row alone); ``--scales spread``
divides each opinion by the spread of its held-out scores instead of their mean (measured, not kept): the
comparison in the README.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from score_ablation import finished_runs, pixel_auroc  # beside this script

from stfpm_ray.core.anomaly_map import image_scores, stored_map_size
from stfpm_ray.core.calibration import calibration
from stfpm_ray.core.checkpoint import load_checkpoint
from stfpm_ray.core.fit import load_images, split_train_val, validation_scores
from stfpm_ray.core.memory_bank import DEFAULT_BANK_SIZE, NEIGHBOURS
from stfpm_ray.core.model import STFPM
from stfpm_ray.core.score import DEFAULT_MAP_SIZE
from stfpm_ray.data.images import load_mask
from stfpm_ray.data.mvtec import test_samples, train_images
from stfpm_ray.evaluate.metrics import image_auroc
from stfpm_ray.progress import fixed_width_table

BATCH = 16
COLUMNS = ("category", "run", "map", "image AUROC", "pixel AUROC", "false alarms", "recall", "scoring ms / image")


def spread_scales(model: STFPM, images: torch.Tensor) -> tuple[float, ...]:
    """The variant measured and not kept: each opinion divided by the standard deviation of its image scores on
    the held-out good images instead of their mean."""
    scores = [
        torch.stack([image_scores(m) for m in model.opinion_maps(images[i : i + BATCH])], 1)
        for i in range(0, len(images), BATCH)
    ]
    return tuple(float(v) for v in torch.cat(scores).std(dim=0))


def category_rows(folder: Path, record: dict, checkpoint: str, size: int, neighbours: int, scales: str) -> list[tuple]:
    config = record["config"]
    model, meta = load_checkpoint(checkpoint)
    category, shape = meta.category, meta.input_size
    train, held_out = split_train_val(train_images(record["data"], category), config["val_fraction"], config["seed"])
    train_tensor, _ = load_images(train, shape)
    val_tensor, _ = load_images(held_out, shape)
    model.add_memory(train_tensor, val_tensor, size, config["seed"], BATCH)
    if (neighbours, scales) != (NEIGHBOURS, "mean"):  # a variant training does not build
        model.memory_neighbours = neighbours
        model.map_scales = (
            model.opinion_scales(val_tensor, BATCH) if scales == "mean" else spread_scales(model, val_tensor)
        )
    # the threshold training would deploy with the memory: calibrated on the combined held-out scores
    deployed = {
        "student": meta.threshold,
        "both": calibration(validation_scores(model, val_tensor, BATCH), config["target_far"])[0],
    }
    samples = test_samples(record["data"], category)
    labels = np.array([s.label for s in samples])
    masks = [load_mask(s.mask_path, stored_map_size(shape, DEFAULT_MAP_SIZE)) if s.mask_path else None for s in samples]
    bank, student, memory = model.memory_bank, [], []
    seconds = {"student": 0.0, "both": 0.0}  # predict's time without and with the memory, side by side
    for start in range(0, len(samples), BATCH):
        images, _ = load_images([s.path for s in samples[start : start + BATCH]], shape)
        model.memory_bank = None
        began = time.perf_counter()
        model.predict(images)
        seconds["student"] += time.perf_counter() - began
        model.memory_bank = bank
        began = time.perf_counter()
        maps = model.opinion_maps(images)  # predict's work with a memory, less the final average
        seconds["both"] += time.perf_counter() - began
        student.append(maps[0])
        memory.append(maps[1])
    both = (torch.cat(student) / model.map_scales[0] + torch.cat(memory) / model.map_scales[1]) / 2
    rows = []
    for name, maps in (("student", torch.cat(student)), ("memory", torch.cat(memory)), ("both", both)):
        scores = image_scores(maps).numpy()
        image = image_auroc(labels, scores)
        ms = f"{1000 * seconds[name] / len(samples):.0f}" if name in seconds else "-"
        far = recall = "-"
        if name in deployed:
            flagged = scores > deployed[name]
            far = f"{flagged[labels == 0].mean():.1%} of {(labels == 0).sum()}"
            recall = f"{flagged[labels == 1].mean():.1%}"
        rows.append((category, folder.name, name, f"{image:.4f}", f"{pixel_auroc(maps, masks):.4f}", far, recall, ms))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="finished `stfpm-ray benchmark` folders (--out)")
    parser.add_argument("--size", type=int, default=DEFAULT_BANK_SIZE, help="memory bank positions")
    parser.add_argument("--neighbours", type=int, default=NEIGHBOURS, help="nearest memory rows averaged")
    parser.add_argument(
        "--scales", choices=("mean", "spread"), default="mean", help="held-out statistic each opinion is divided by"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for folder, record, checkpoint in finished_runs(args.folders):
        found = category_rows(folder, record, checkpoint, args.size, args.neighbours, args.scales)
        print(fixed_width_table(COLUMNS, found), flush=True)
        rows += found
    print(fixed_width_table(COLUMNS, rows, rule=True))


if __name__ == "__main__":
    main()
