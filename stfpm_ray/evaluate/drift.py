"""Does the operating point still hold? A run's scores against the good scores its threshold was set from.

An operating point promises a false-alarm rate on good images (``target_far``). Any real line drifts between
the day its good images were captured and the night being scored (lighting, pose, camera, season), and a
drift that lifts good images over the threshold silently turns the nightly list of flagged images into a
list of everything. So every run checks, per category, whether the promise held:

* **With labels** (a benchmark, a test split): the false-alarm rate of the good images is measured directly,
  and defective images do not count.
  The point does not hold when it is significantly above the target (one-sided binomial test, p <
  :data:`ALPHA`) and more than twice it.
* **Without labels** (a nightly archive), the flag rate stands in for it, since defects are rare: the point
  does not hold when the flag rate is significantly above the target and more than twice it, **and** the
  bulk of the scores moved: the median score is above the 90% quantile of the reference good scores (more
  than half of tonight's images score where only a tenth of good ones used to). A burst of real defects
  raises the flag rate but leaves the median where it was, as long as fewer than about 40% of the images are
  defective; a drift moves everything.

Beside the decision, the figures an operator can read: the flag rate and the target, the ratio of the
medians, and a two-sample Kolmogorov-Smirnov test of the distributions. Fewer than :data:`MIN_IMAGES` scores
decide nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from stfpm_ray.core.calibration import OperatingPoint

# Significance of "above the target": a nightly check that cries wolf one night in a hundred by chance.
ALPHA = 0.01
# How far above the target a false-alarm rate must be to call the operating point broken, not merely noisy.
FACTOR = 2.0
# The fewest scores a judgement is made on.
MIN_IMAGES = 10
# Where "the bulk moved" is measured: the reference's quantile that tonight's median must exceed.
BULK_QUANTILE = 0.9


def _above_target(flagged: int, n: int, target: float) -> tuple[bool, float]:
    """Whether ``flagged`` of ``n`` is significantly (p < ALPHA) and substantially (> FACTOR x) above ``target``."""
    p_value = float(stats.binom.sf(flagged - 1, n, target)) if n else 1.0
    return p_value < ALPHA and flagged / n > FACTOR * target, p_value


def assess(
    scores: np.ndarray, labels: np.ndarray | None, point: OperatingPoint, thresholds: float | np.ndarray | None = None
) -> dict[str, Any]:
    """Whether ``point`` held for these scores (``labels``: 0 good, 1 defective, -1 or NaN unknown), with figures.

    ``thresholds``: what decided each score, where that is not the point's one threshold (an adaptive point
    decides each run at its own). Returns ``{"detected": bool, "reason": str, ...figures}`` for
    ``metrics.json`` and the nightly report.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.full(scores.shape, -1.0) if labels is None else np.nan_to_num(np.asarray(labels, float), nan=-1.0)
    decided_at = np.broadcast_to(point.threshold if thresholds is None else thresholds, scores.shape)
    reference = np.asarray(point.scores, dtype=np.float64)
    labelled = bool((labels >= 0).any())  # defective rows never count: with labels, only good ones are judged
    basis, mask = ("labelled good images", labels == 0) if labelled else ("all images", np.ones(scores.shape, bool))
    judged = scores[mask]
    flagged = int((judged > decided_at[mask]).sum())
    figures: dict[str, Any] = {
        "operating_point": point.id,
        "method": point.method,
        "basis": basis,
        "n": int(judged.size),
        "flagged": flagged,
        "rate": flagged / judged.size if judged.size else math.nan,
        "target_far": point.target_far,
        "median_ratio": _median_ratio(judged, reference),
        **_ks(judged, reference),
    }
    if judged.size < MIN_IMAGES:
        return {"detected": False, "reason": f"too few images to judge ({judged.size} < {MIN_IMAGES})", **figures}
    if not 0 < point.target_far < 1:
        return {"detected": False, "reason": "the operating point records no target false-alarm rate", **figures}
    above, figures["p_value"] = _above_target(flagged, judged.size, point.target_far)
    if basis == "all images":
        edge = float(np.quantile(reference, BULK_QUANTILE)) if reference.size >= 3 else point.threshold
        figures["bulk_moved"] = bool(np.median(scores) > edge)
        above = above and figures["bulk_moved"]
    reason = (
        f"{basis}: {flagged} of {judged.size} flagged ({figures['rate']:.1%}), target {point.target_far:.1%}"
        if above
        else "the flag rate is within what the target allows"
    )
    return {"detected": bool(above), "reason": reason, **figures}


def _median_ratio(scores: np.ndarray, reference: np.ndarray) -> float:
    if not scores.size or not reference.size or np.median(reference) <= 0:
        return math.nan
    return float(np.median(scores) / np.median(reference))


def _ks(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Two-sample Kolmogorov-Smirnov test of the scores against the reference good scores (NaN without them)."""
    if scores.size < 2 or reference.size < 3:
        return {"ks_statistic": math.nan, "ks_p_value": math.nan}
    result = stats.ks_2samp(scores, reference)
    return {"ks_statistic": float(result.statistic), "ks_p_value": float(result.pvalue)}


def run_drift(rows: pa.Table, points: dict[str, OperatingPoint]) -> dict[str, dict[str, Any]]:
    """:func:`assess` per category of a run's rows (``category``, ``score``, ``label``, ``status``), against each
    category's operating point; categories without a point (no checkpoint) or without ok rows are left out.
    ``threshold`` is what decides the run's rows (an adaptive point's is the run's own), ``run_flagged`` how
    many of its ok rows it flags, labelled or not."""
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    found = {}
    for category in sorted(set(ok["category"].to_pylist()) & points.keys()):
        mine = ok.filter(pc.equal(ok["category"], category))
        labels = mine["label"].to_numpy(zero_copy_only=False).astype(np.float64)
        scores = mine["score"].to_numpy(zero_copy_only=False).astype(np.float64)
        threshold = points[category].threshold_for(scores)
        found[category] = {
            **assess(scores, labels, points[category], threshold),
            "threshold": threshold,
            "run_flagged": int((scores > threshold).sum()),
        }
    return found


def drift_line(category: str, drift: dict[str, Any], checkpoints: str) -> str:
    """The one line an operator reads when a category's operating point did not hold, with what to do."""
    ratio = drift["median_ratio"]
    moved = f"; median score {ratio:.2g}x the calibration's" if math.isfinite(ratio) else ""
    return (
        f"{category}: the operating point ({drift['operating_point']}) no longer holds: {drift['reason']}{moved}. "
        f"Check the line (lighting, camera, pose); if the change is meant to stay, recalibrate from a few known-good "
        f"images of it: stfpm-ray calibrate --checkpoints {checkpoints} --category {category} --good FOLDER"
    )
