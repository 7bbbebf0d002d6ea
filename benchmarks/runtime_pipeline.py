"""The whole scoring pipeline with each runtime, side by side: same images, same machine, rounds interleaved.

For ``--runtime torch`` and ``--runtime onnxruntime`` (and ``auto``, which measures and picks): images/s of
``score_images`` over a flat archive (files to committed Parquet, start-up and the export at start included),
the same on the first half of the archive, whose difference gives the rate a long run sustains, and image
AUROC on the category's labelled test split scored through the same pipeline. Ratios are to torch.

    python benchmarks/runtime_pipeline.py --checkpoints runs/real256s/checkpoints --data ../shared/data/mvtec \\
        --category bottle --images 400 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray

from stfpm_ray.core.runtimes import RUNTIMES
from stfpm_ray.evaluate.metrics import image_auroc
from stfpm_ray.progress import fixed_width_table, quiet
from stfpm_ray.ray.pipeline import ScoringOptions
from stfpm_ray.store.scores import ScoresTable
from stfpm_ray.workflows.score import score_images

COLUMNS = ("runtime", "chosen", "images/s", "start-up excluded", "x torch", "x torch (steady)", "image AUROC")


def archive(test_dir: Path, folder: Path, count: int) -> list[Path]:
    """``count`` test images (repeated, hard-linked under distinct names) in one flat folder."""
    sources = sorted(test_dir.glob("*/*.png"))
    folder.mkdir(parents=True)
    made = []
    for i in range(count):
        made.append(folder / f"img_{i:05d}.png")
        os.link(sources[i % len(sources)], made[-1])
    return made


def timed(run: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    run()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--data", required=True, help="MVTec-layout root holding --category")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=2, help="rounds; the best rate of each runtime counts")
    parser.add_argument("--runtimes", default="torch,onnxruntime,openvino,auto")
    args = parser.parse_args()
    chosen = [name for name in args.runtimes.split(",") if name in RUNTIMES]

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="runtime-bench-"))
    try:
        root = Path(args.data) / args.category
        full = archive(root / "test", work / "full", args.images)
        half = work / "half"
        half.mkdir()
        for path in full[: len(full) // 2]:
            os.link(path, half / path.name)
        rates: dict[str, dict[str, float]] = {name: {} for name in chosen}
        picked: dict[str, str] = {}
        for round_ in range(args.repeat):
            for name in chosen:
                options = ScoringOptions(runtime=name)
                for label, folder, count in (("full", work / "full", len(full)), ("half", half, len(full) // 2)):
                    out = work / f"out-{name}-{label}"

                    def run(folder: Path = folder, out: Path = out, options: ScoringOptions = options) -> None:
                        score_images(
                            args.checkpoints, str(folder), out, options, args.category, overwrite=True, progress=quiet
                        )

                    rate = timed(run, count)
                    rates[name][label] = max(rates[name].get(label, 0.0), rate)
                    workers = ScoresTable(str(out)).history()[0]["manifest"]["workers"]
                    picked[name] = ",".join(sorted({w.get("runtime", "torch") for w in workers}))
                    print(f"round {round_ + 1}: {name:<12} {label:<5} {rate:7.2f} images/s", flush=True)
        aurocs = {}
        for name in chosen:
            out = work / f"labelled-{name}"
            # the MVTec root, routed by folder (labels from the layout); the category's rows only
            score_images(args.checkpoints, args.data, out, ScoringOptions(runtime=name), progress=quiet)
            rows = ScoresTable(str(out)).dataset().to_table(columns=["category", "label", "score"]).to_pandas()
            rows = rows[rows.category == args.category]
            aurocs[name] = image_auroc(rows.label.to_numpy(), rows.score.to_numpy())
        n = len(full)

        def steady(name: str) -> float:
            return (n - n // 2) / (n / rates[name]["full"] - (n // 2) / rates[name]["half"])

        base = "torch" if "torch" in chosen else chosen[0]
        table = [
            (
                name,
                picked[name],
                f"{rates[name]['full']:.2f}",
                f"{steady(name):.2f}",
                f"{rates[name]['full'] / rates[base]['full']:.2f}",
                f"{steady(name) / steady(base):.2f}",
                f"{aurocs[name]:.4f}",
            )
            for name in chosen
        ]
        print(f"\n{args.category}: {n} images, {os.cpu_count()} CPUs, best of {args.repeat} rounds, default options")
        print(fixed_width_table(COLUMNS, table, rule=True))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
