"""Exported (ONNX in onnxruntime, or OpenVINO IR with ``--format openvino``) vs PyTorch scores of the same
checkpoints on their MVTec test images.

Per category: the largest absolute difference of image scores and of full-size anomaly maps (fp32), the
tolerance they must stay within (``PARITY_TOLERANCE`` x the threshold), image AUROC of both to 4 decimals,
and whether both flag the same images at the threshold in force. Exports go to a temporary folder (or
``--out``) through ``stfpm-ray export``'s own workflow; the checkpoints are only read.

    python benchmarks/export_parity.py runs/seeds/mvtec_s0/checkpoints --data ../shared/data/mvtec [--format openvino]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from stfpm_ray.core.exported import SCORERS, parity
from stfpm_ray.core.score import load_scoring_model
from stfpm_ray.data.images import load_image
from stfpm_ray.data.mvtec import test_samples
from stfpm_ray.evaluate.metrics import image_auroc
from stfpm_ray.workflows.export import FORMATS, export_models


def outputs(predict, images: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(maps, scores)`` of every image, ``predict`` called per batch."""
    parts = [predict(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def exported_predict(out: Path, record: dict) -> Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]:
    """``(maps, scores)`` of a batch by the written export file, read back by its own runtime."""
    scorer = SCORERS[FORMATS[record["format"]]](str(out / record["model_file"]), None)
    return lambda batch: tuple(t.numpy() for t in scorer.predict(batch))


def compare(checkpoints: Path, out: Path, data: Path, record: dict, batch_size: int) -> str:
    """One table row: the category's torch and exported outputs side by side."""
    category = record["category"]
    model, meta = load_scoring_model(str(checkpoints / category))
    samples = test_samples(data, category)
    images = torch.from_numpy(np.stack([load_image(s.path, meta.input_size) for s in samples])).permute(0, 3, 1, 2)
    labels = np.array([s.label for s in samples])
    torch_out = outputs(lambda b: tuple(t.numpy() for t in model.predict(b, "fp32")), images, batch_size)
    onnx_out = outputs(exported_predict(out, record), images, batch_size)
    check = parity(torch_out, onnx_out, meta.operating_point.threshold)
    flagged = int((onnx_out[1] > meta.operating_point.threshold).sum())
    return (
        f"{category:<10} {len(samples):>6} {meta.image_size:>4} {check.max_score_diff:>14.2e} "
        f"{check.max_map_diff:>12.2e} {check.tolerance:>10.2e} {image_auroc(labels, torch_out[1]):>11.4f} "
        f"{image_auroc(labels, onnx_out[1]):>12.4f} {flagged:>7} {'yes' if check.same_flagged else 'NO':>12} "
        f"{'holds' if check.holds else 'FAILS':>7}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", type=Path, help="CKPT_DIR of <category>/ checkpoints")
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout root with the categories' test images")
    parser.add_argument("--categories", help="comma-separated (default: every checkpoint)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, help="keep the exports here (default: a temporary folder)")
    parser.add_argument("--format", default="onnx", choices=("onnx", "openvino"))
    args = parser.parse_args()
    categories = args.categories.split(",") if args.categories else None
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        records = export_models(args.checkpoints, out, categories, args.format, overwrite=True, progress=print)
        runtime = "onnxruntime" if args.format == "onnx" else "openvino"
        print(
            f"torch {torch.__version__} ({torch.get_num_threads()} threads) vs {runtime} {version(runtime)} CPU, "
            f"batch {args.batch_size}"
        )
        print(
            f"{'category':<10} {'images':>6} {'px':>4} {'max |score d|':>14} {'max |map d|':>12} {'tolerance':>10} "
            f"{'AUROC torch':>11} {'AUROC export':>12} {'flagged':>7} {'same flagged':>12} {'parity':>7}"
        )
        for category in sorted(records):
            print(compare(args.checkpoints, out, args.data, records[category], args.batch_size))


if __name__ == "__main__":
    main()
