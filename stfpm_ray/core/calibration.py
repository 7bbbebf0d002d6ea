"""Operating points: the threshold that decides ``is_anomalous``, set from known-good images alone.

An operating point promises a false-alarm rate on good images (``target_far``). Training sets the first one
from the held-out good validation images; ``stfpm-ray calibrate`` adds later ones from a handful of good
images of new conditions (a later day, another lighting), without retraining: a checkpoint keeps every
operating point it has had, the newest in force. Each one keeps the good scores it was set from, the
reference a scoring run compares its own scores with (:mod:`stfpm_ray.evaluate.drift`).

The threshold model (:func:`calibration`): the maximum of a few dozen validation scores is no operating
point (with n images the next good image exceeds it with probability 1/(n+1), so 8 validation images flag
about 11% of good parts). The log scores are taken as Gaussian (scores are maxima of products of distances:
positive, right-skewed) and the threshold is the upper ``1 - target_far`` prediction bound,
``mean + t(n-1) * std * sqrt(1 + 1/n)``: with the Student t quantile, a new good image exceeds it with
probability ``target_far`` exactly under that model, whatever n, where a plug-in Gaussian quantile would
under-shoot at small n.

Real good scores have heavier tails than a log-normal (screw), so the fit alone can promise too little; the
threshold therefore never falls below the k-th largest good score, ``k = max(1, floor((n + 1) * target_far))``,
a bound that holds whatever the distribution: a new good image exceeds the k-th largest of n exchangeable good
scores with probability k/(n+1) <= target_far. Below 2/target_far - 1 images (39 at 5%) k is 1, the largest
score; above, one outlying good image no longer sets the threshold, which the largest score let it do (on the
shared elpv_mono, 88 validation images at 5%: a threshold 2.7 times the next score, catching 60% of the
defects instead of 76%, at 0% false alarms where the target allowed 5%; README: Operating point).

An **adaptive** point (``stfpm-ray calibrate --adaptive``) sets each scoring run's threshold from the run
itself: the same log-normal prediction bound at the target, with the run's median and scaled median absolute
deviation of the log scores in place of the good scores' mean and standard deviation, so that the few defects
of a night hardly move it. A night that moved as a whole (exposure, zoom, a noisier camera) moves its
threshold with it, with no good image of the new conditions; it assumes what a fixed point does not, that
defects are a small minority of the run (with a third of the images defective the median itself moves, and
recall falls). Runs of fewer than ``MIN_RUN_IMAGES`` images are decided by the point's fixed threshold (set
from good scores like any other), which is also what the scorers store in ``is_anomalous``: the stored column
cannot know the run's own threshold; ``evaluate`` and the nightly report decide with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from scipy.stats import t as student_t

CALIBRATION_METHOD = "lognormal-t"
# The fewest good scores a threshold is fitted to; fewer leave the maximum (method "max").
MIN_FIT_IMAGES = 3
# The id of the operating point set at training.
TRAINING_POINT = "training"
ADAPTIVE = "adaptive"
# The fewest images of a run whose median and spread an adaptive point trusts.
MIN_RUN_IMAGES = 20
# The scaled MAD estimates a Gaussian's standard deviation.
MAD_SCALE = 1.4826
# The network precision good scores are computed in by training and ``calibrate``, and that of operating points
# whose record does not say (all of them before the record did).
CALIBRATED_PRECISION = "fp32"


def calibration(
    scores: np.ndarray, target_far: float, precision: str = CALIBRATED_PRECISION
) -> tuple[float, dict[str, float], dict[str, Any]]:
    """Threshold at ``target_far`` false alarms on good images, from good scores alone (see the module doc).

    The larger of the log-normal fit and the order-statistic floor (``bound`` says which binds). Fewer than
    ``MIN_FIT_IMAGES`` scores, or a non-positive one, leave the maximum (method ``max``). Returns (threshold,
    score statistics, the record a checkpoint stores, which keeps the scores themselves and the ``precision``
    they were computed in, which scoring with ``--precision auto`` follows).
    """
    val_max = float(scores.max())
    stats = {
        "val_count": float(len(scores)),
        "val_mean": float(scores.mean()),
        "val_std": float(scores.std()),
        "val_min": float(scores.min()),
        "val_max": val_max,
    }
    record: dict[str, Any] = {
        "method": "max",
        "target_far": target_far,
        "n_val": len(scores),
        "val_max": val_max,
        "scores": [float(v) for v in scores],
        "precision": precision,
    }
    if len(scores) < MIN_FIT_IMAGES or not (scores > 0).all():
        return val_max, stats, record
    logs = np.log(scores)
    log_mean, log_std = float(logs.mean()), float(logs.std(ddof=1))
    factor = prediction_factor(len(scores), target_far)
    fitted = float(np.exp(log_mean + factor * log_std))
    rank = max(1, math.floor((len(scores) + 1) * target_far))
    floor = float(np.sort(scores)[len(scores) - rank])
    record.update(
        method=CALIBRATION_METHOD,
        log_mean=log_mean,
        log_std=log_std,
        t_factor=factor,
        fitted_threshold=fitted,
        floor_rank=rank,
        floor=floor,
        bound="fit" if fitted >= floor else "val_max" if rank == 1 else "order statistic",
    )
    return max(fitted, floor), stats, record


def prediction_factor(n: int, target_far: float) -> float:
    """How many standard deviations above the mean of n Gaussian samples a new one exceeds with probability
    ``target_far``: the Student t quantile, widened by sqrt(1 + 1/n) for the estimated mean."""
    return float(student_t.ppf(1.0 - target_far, df=n - 1) * np.sqrt(1.0 + 1.0 / n))


@dataclass(frozen=True)
class OperatingPoint:
    """One operating point of a checkpoint: its threshold, its promise, and the good scores it came from.

    ``scores`` is empty for checkpoints written before operating points kept them; ``source`` says where
    the good images came from (``training``: the held-out validation images); ``precision`` is the network
    precision of those scores (fp32 for points written before the record said).
    """

    id: str
    threshold: float
    target_far: float
    method: str
    source: str
    created_at: str | None = None
    scores: tuple[float, ...] = ()
    precision: str = CALIBRATED_PRECISION
    record: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def adaptive(self) -> bool:
        return self.method == ADAPTIVE

    def threshold_for(self, run_scores: np.ndarray) -> float:
        """The threshold that decides a run's scores: the fixed one, or for an adaptive point with enough
        positive scores, the prediction bound of the run's own log median and robust spread."""
        run_scores = np.asarray(run_scores, dtype=np.float64)
        fewest = self.record.get("min_run_images", MIN_RUN_IMAGES)
        if not self.adaptive or run_scores.size < fewest or not (run_scores > 0).all():
            return self.threshold
        bound = robust_bound(run_scores, self.target_far)
        return self.threshold if bound is None else bound

    def summary(self) -> dict[str, Any]:
        """The point as reports show it (its scores left out)."""
        return {
            "id": self.id,
            "threshold": self.threshold,
            "target_far": self.target_far,
            "method": self.method,
            "source": self.source,
            "created_at": self.created_at,
            "n_images": len(self.scores) or None,
        }


def robust_bound(scores: np.ndarray, target_far: float) -> float | None:
    """The log-normal prediction bound at ``target_far`` with the median and scaled median absolute deviation of
    the log scores in place of mean and standard deviation, a place and spread that a few outlying images
    (defects among a night's good ones) hardly move; None where the scores have no spread."""
    logs = np.log(scores)
    centre = float(np.median(logs))
    spread = float(MAD_SCALE * np.median(np.abs(logs - centre)))
    return float(np.exp(centre + prediction_factor(len(scores), target_far) * spread)) if spread > 0 else None


def training_point(threshold: float, record: dict[str, Any]) -> OperatingPoint:
    """The operating point training set (``record`` is the checkpoint's ``calibration``; empty for checkpoints
    older than the record, whose threshold is the validation maximum)."""
    return OperatingPoint(
        id=TRAINING_POINT,
        threshold=float(threshold),
        target_far=float(record.get("target_far", float("nan"))),
        method=str(record.get("method", "max")),
        source="training: held-out good validation images",
        scores=tuple(float(v) for v in record.get("scores", ())),
        precision=str(record.get("precision", CALIBRATED_PRECISION)),
        record=dict(record),
    )


def later_point(record: dict[str, Any]) -> OperatingPoint:
    """An operating point ``calibrate`` added, from its stored record."""
    return OperatingPoint(
        id=str(record["id"]),
        threshold=float(record["threshold"]),
        target_far=float(record["target_far"]),
        method=str(record["method"]),
        source=str(record["source"]),
        created_at=record.get("created_at"),
        scores=tuple(float(v) for v in record.get("scores", ())),
        precision=str(record.get("precision", CALIBRATED_PRECISION)),
        record=dict(record),
    )


def new_point(
    scores: np.ndarray,
    target_far: float,
    source: str,
    existing: Sequence[dict[str, Any]],
    precision: str = CALIBRATED_PRECISION,
    adaptive: bool = False,
) -> dict[str, Any]:
    """The record of an operating point set from the good ``scores`` of ``source`` (computed in ``precision``),
    numbered after ``existing``; ``adaptive``: one that decides each run of enough images at the run's own bound
    (see the module doc)."""
    threshold, _, record = calibration(scores, target_far, precision)
    if adaptive:
        record = {**record, "fixed_method": record["method"], "method": ADAPTIVE, "min_run_images": MIN_RUN_IMAGES}
    return {
        **record,
        "id": f"calibrate-{len(existing) + 1}",
        "threshold": threshold,
        "source": source,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
