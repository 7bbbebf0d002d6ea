"""``stfpm-ray calibrate``: a new operating point for a category from a handful of known-good images.

When a line drifts (lighting, pose, camera) and the change is meant to stay, the threshold set at training
flags good images; retraining is not needed to fix that, a threshold set on good images of the new conditions
is. The steps:

1. **Check the checkpoint** of the category, as ``score`` does
   (:func:`~stfpm_ray.core.checkpoint.discover_checkpoints`).
2. **Read the good images** (a folder, files or an ``s3://`` prefix) through the scoring path itself
   (:mod:`stfpm_ray.data.plan` and :func:`stfpm_ray.core.score.score_block`), so they are decoded and scored
   exactly as a nightly run would. A few dozen images need no cluster: this runs on this machine.
3. **Set the operating point** with the threshold model of training (:mod:`stfpm_ray.core.calibration`) at
   ``--target-far`` (default: the target of the point in force). ``--adaptive`` makes it a point that decides
   each run from the run's own median and spread; without ``--good`` it is set from the good scores of the
   point in force (for lines whose nights move as a whole and where no good image of the new conditions is
   at hand).
4. **Record it** in the checkpoint (:func:`~stfpm_ray.core.checkpoint.add_operating_point`): the earlier points
   stay, the weights and ``model_id`` do not change. Later runs decide with the new point, and the rows
   already in a scores table are decided again when read (``evaluate``, reports): nothing is rescored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from stfpm_ray.core.calibration import CALIBRATED_PRECISION, MIN_RUN_IMAGES, new_point
from stfpm_ray.core.checkpoint import CheckpointMeta, add_operating_point, discover_checkpoints
from stfpm_ray.core.score import ScoreSettings, ScoringModels, cpu_chunk, score_block
from stfpm_ray.data.listing import list_images
from stfpm_ray.data.plan import decode_block, plan
from stfpm_ray.errors import InputNotFoundError, UserError
from stfpm_ray.progress import Progress, log_progress

# Fewer good images than this set no threshold worth the name; from about 20 on it is tight.
MIN_GOOD_IMAGES = 5
# Images decoded and scored at a time: the memory of a few dozen, whatever the folder holds.
BLOCK_ROWS = 64
DEFAULT_TARGET_FAR = 0.05


def calibrate(
    checkpoints: str | Path,
    good: str | Sequence[str] | None,
    category: str | None = None,
    target_far: float | None = None,
    adaptive: bool = False,
    progress: Progress = log_progress,
) -> dict[str, Any]:
    """Add an operating point to ``category``'s checkpoint from the known-good images under ``good`` (an
    adaptive point may leave them out: the good scores of the point in force are used).

    Returns ``{"category", "point", "before", "after"}``: the new point (without its scores) and how many of
    the good images the point in force before, and the new one, flag.
    """
    if target_far is not None and not 0.0 < target_far < 0.5:
        raise UserError(f"--target-far must be in (0, 0.5), got {target_far}")
    if good is None and not adaptive:
        raise UserError("--good is required: the images known to be good to set the threshold from")
    name, folder, meta = _checkpoint(checkpoints, category)
    before = meta.operating_point
    if good is None:
        scores, source = np.asarray(before.scores, dtype=np.float64), f"the good scores of {before.id}"
        precision = before.precision
    else:
        inputs = [good] if isinstance(good, str) else [str(item) for item in good]
        scores = _good_scores(inputs, name, folder, meta, progress)
        source, precision = f"{len(scores)} good images under {', '.join(inputs)}", CALIBRATED_PRECISION
    target = target_far or (before.target_far if 0 < before.target_far < 1 else DEFAULT_TARGET_FAR)
    record = new_point(scores, target, source, meta.operating_points, precision, adaptive=adaptive)
    point = add_operating_point(folder, meta, record).operating_point
    flagged = {"before": int((scores > before.threshold).sum()), "after": int((scores > point.threshold).sum())}
    kind = "adaptive operating point" if point.adaptive else "operating point"
    progress(
        f"[{name}] {kind} {point.id} from {source}: threshold {before.threshold:.4g} ({before.id}) -> "
        f"{point.threshold:.4g}, target false-alarm rate {target:.1%}; of these images the old point flagged "
        f"{flagged['before']}, the new one {flagged['after']}"
    )
    if point.adaptive:
        progress(
            f"[{name}] each later run of at least {MIN_RUN_IMAGES} images is decided at its own bound (median and "
            f"spread of its log scores, target {target:.1%}); smaller runs at {point.threshold:.4g}"
        )
    progress(f"[{name}] later runs decide with {point.id}; rows already scored are decided again when read")
    return {"category": name, "point": point.summary(), **flagged}


def _checkpoint(checkpoints: str | Path, category: str | None) -> tuple[str, str, CheckpointMeta]:
    """The category's sound checkpoint; the category may be left out where there is one checkpoint only."""
    found, problems = discover_checkpoints(checkpoints)
    if category in problems:
        raise UserError(f"the checkpoint of {category!r} is unusable: {problems[category]}")
    if category is None:
        if len(found) != 1:
            raise UserError(f"{checkpoints} holds checkpoints of {', '.join(sorted(found))}: pass --category")
        category = next(iter(found))
    if category not in found:
        raise UserError(
            f"no checkpoint for category {category!r} under {checkpoints} (have: {', '.join(sorted(found))})"
        )
    folder, meta = found[category]
    return category, folder, meta


def _good_scores(inputs: list[str], category: str, folder: str, meta: CheckpointMeta, progress: Progress) -> np.ndarray:
    """Scores of the good images, read, decoded and scored as a scoring run would; unreadable ones skipped."""
    listing = list_images(inputs)
    planned = plan(listing, {category: meta}, {}, category, None, BLOCK_ROWS, split="all")
    if not planned.blocks:
        raise InputNotFoundError(f"no image files under {', '.join(inputs)}")
    models = ScoringModels({category: (folder, meta)})
    settings = ScoreSettings(precision=CALIBRATED_PRECISION, chunk=cpu_chunk("cpu", torch.get_num_threads()))
    rows = pa.concat_tables(
        score_block(decode_block(block, listing.sources), models, settings, "calibrate") for block in planned.blocks
    )
    failed = rows.filter(pc.equal(rows["status"], "error"))
    for path, error in zip(failed["path"].to_pylist(), failed["error"].to_pylist()):
        progress(f"[{category}] skipped {path}: {error}")
    scores = rows.filter(pc.equal(rows["status"], "ok"))["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    if scores.size < MIN_GOOD_IMAGES:
        raise UserError(
            f"{scores.size} readable good images under {', '.join(inputs)}; a threshold needs at least "
            f"{MIN_GOOD_IMAGES} (a few dozen make it tight)"
        )
    return scores
