"""Image- and pixel-level anomaly detection metrics (MVTec AD definitions).

Image metrics take one score per image and are computed exactly with scikit-learn. Pixel metrics see every
pixel of every test image of a category (1,000 images at 256x256 are 65 M pixels, and 15 categories may be
evaluated at once), so :class:`PixelMetrics` accumulates fixed-size histograms image by image instead of
keeping maps; :func:`aupro_exact` is the in-memory reference it is tested against.

AUPRO (Bergmann et al., MVTec AD): the connected components (8-connectivity) of every ground-truth mask are
regions. For a threshold ``t``, PRO(t) is the mean over all regions of all images of the fraction of the
region's pixels with score ``>= t``, and FPR(t) the fraction of all normal pixels (good images included)
with score ``>= t``. The PRO-over-FPR curve is integrated with the trapezoid rule from 0 to ``fpr_limit``
(interpolated at exactly the limit) and divided by ``fpr_limit``, so a perfect map scores 1.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

# 8-connectivity, as in the MVTec AD evaluation code.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)
# Bin count and spacing of PixelMetrics: see its docstring for the measurements behind them.
DEFAULT_BINS = 2**16
_SPACING_POWER = 6.0


def _check_labels_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (bool labels, float64 scores) as 1-D arrays, or raise ValueError naming the problem."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}")
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.size} vs {scores.size}")
    if labels.size == 0:
        raise ValueError("labels and scores are empty")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (found NaN or inf)")
    return labels.astype(bool), scores


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores; NaN when only one class is present.

    NaN rather than an exception because a category without defective (or without good) test images is a
    legitimate input for a multi-category report, where it should show as "undefined", not abort the run.
    """
    positive, scores = _check_labels_scores(labels, scores)
    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, scores))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (anomalous when ``score >= threshold``).

    Returns ``(nan, nan)`` without anomalous images, where recall (hence F1) is undefined. Among thresholds
    with equal F1 the lowest is returned.
    """
    positive, scores = _check_labels_scores(labels, scores)
    if not positive.any():
        return math.nan, math.nan
    precision, recall, thresholds = precision_recall_curve(positive, scores)
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2.0 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def roc_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the image ROC curve, for plotting.

    With only one class present the curve is undefined and two empty arrays are returned (nothing to draw),
    matching :func:`image_auroc` returning NaN instead of raising.
    """
    positive, scores = _check_labels_scores(labels, scores)
    if positive.all() or not positive.any():
        return np.empty(0), np.empty(0)
    fpr, tpr, _ = roc_curve(positive, scores)
    return fpr, tpr


def _rate(hits: int, total: int) -> float:
    return hits / total if total else math.nan


def operating_point(labels: np.ndarray, flagged: np.ndarray, defects: np.ndarray) -> dict:
    """Confusion counts, false-alarm rate and recall of the decisions actually made (``is_anomalous``).

    Unlike :func:`f1_max`, whose threshold is chosen on the test labels it is scored against, these are the
    figures a deployment sees. Recall is also broken down by defect type (``defects``: one name per image,
    None when unknown), because one type the model misses hides inside a good overall recall.
    """
    positive, flagged = np.asarray(labels) == 1, np.asarray(flagged, dtype=bool)
    negative = np.asarray(labels) == 0
    tp, fn = int((positive & flagged).sum()), int((positive & ~flagged).sum())
    fp, tn = int((negative & flagged).sum()), int((negative & ~flagged).sum())
    per_defect = {}
    names = np.array([name if isinstance(name, str) else "unknown" for name in defects], dtype=object)
    for name in sorted(set(names[positive])):
        chosen = positive & (names == name)
        detected = int((chosen & flagged).sum())
        per_defect[name] = {"n": int(chosen.sum()), "detected": detected, "recall": _rate(detected, int(chosen.sum()))}
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "false_alarm_rate": _rate(fp, fp + tn),
        "recall": _rate(tp, tp + fn),
        "recall_per_defect": per_defect,
    }


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def _check_map(anomaly_map: np.ndarray, mask: np.ndarray) -> None:
    if anomaly_map.shape != mask.shape:
        raise ValueError(f"anomaly map shape {anomaly_map.shape} differs from mask shape {mask.shape}")
    if not np.isfinite(anomaly_map).all():
        raise ValueError("anomaly map contains NaN or inf")
    if anomaly_map.size and anomaly_map.min() < 0:
        raise ValueError(f"anomaly map has negative values (min {anomaly_map.min()}); STFPM maps are non-negative")


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel weight ``1 / area of its region`` (0 on normal pixels) and the number of regions.

    PRO(t) = (1/R) sum_regions (pixels >= t)/area = (1/R) sum_{anomalous pixels >= t} 1/area(region of pixel),
    so a region never needs to be stored: each image's regions are complete within that image, their areas
    are known when it is seen, and the weights can be summed into one histogram.
    """
    regions, count = ndimage.label(mask, structure=_CONNECTIVITY)
    areas = np.bincount(regions.ravel(), minlength=count + 1).astype(np.float64)
    areas[0] = np.inf  # label 0 is background: weight 0
    return 1.0 / areas[regions], count


def _pro_integral(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Normalised trapezoid area under (fpr, pro) from 0 to ``fpr_limit``.

    ``fpr`` must be non-decreasing, start at 0 and end at 1 (thresholds from +inf down to the minimum
    score); the point at exactly ``fpr_limit`` is linearly interpolated on the segment crossing it.
    """
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:end], pro[:end]
    if end < fpr.size:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        x = np.append(x, fpr_limit)
        y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / (2.0 * fpr_limit))


def aupro_exact(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Exact AUPRO of in-memory maps and masks, both ``(N, H, W)``; the reference for :class:`PixelMetrics`.

    Every distinct score is a threshold; tied pixels enter the curve together, so the curve goes straight
    from one distinct score to the next. NaN without anomalous or without normal pixels.
    """
    _check_fpr_limit(fpr_limit)
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks) > 0
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {maps.shape}")
    _check_map(maps, masks)
    weights = np.empty(maps.shape, dtype=np.float64)
    n_regions = 0
    for i, mask in enumerate(masks):
        weights[i], count = _region_weights(mask)
        n_regions += count
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        return math.nan
    order = np.argsort(maps, axis=None, kind="stable")[::-1]
    scores = maps.ravel()[order]
    last_of_tie = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    fpr = np.cumsum(~masks.ravel()[order])[last_of_tie] / n_normal
    pro = np.cumsum(weights.ravel()[order])[last_of_tie] / n_regions
    return _pro_integral(np.append(0.0, fpr), np.append(0.0, pro), fpr_limit)


class PixelMetrics:
    """Streaming pixel AUROC and AUPRO over fixed score bins.

    Memory is three histograms of ``bins`` entries (1.5 MiB at the default 2**16 bins), whatever the number
    of images, pixels or regions:

    - normal-pixel counts and anomalous-pixel counts per bin give the pixel AUROC, pairs that share a bin
      counting 1/2 (as sklearn counts tied scores);
    - for AUPRO, each anomalous pixel adds ``1 / area of its region`` to its bin. PRO(t) is a mean over
      regions, so the sum of these weights over bins ``>= t``, divided by the number of regions, is exactly
      the mean of per-region histograms, which therefore never need to be stored. This needs each image's
      full mask in one :meth:`update`, which is always the case (regions never cross images).

    Bins are equal steps of ``(score / max_score) ** (1 / 6)``. STFPM maps are products of three distances,
    so normal pixels sit orders of magnitude below the top scores: linear bins put most normal pixels into
    the first few bins (pixel AUROC off by up to 0.12 on the maps below, 0.35 with a 100 times loose
    ``max_score``), while the sixth-root spacing keeps a relative resolution of about 0.06% at 1e-5 of
    ``max_score`` and still ``6 / bins`` of it at the top. Scores above ``max_score`` fall into the top bin,
    so a loose upper bound only costs resolution.

    Exactness: every bin edge is a threshold of the exact curve, so the results are those of the exact
    metrics with all scores inside a bin treated as tied. :meth:`binning_error_bounds` turns that into a
    guaranteed bound from the histograms; ``tests/test_metrics.py`` checks both against sklearn and
    :func:`aupro_exact` on STFPM-like maps.
    """

    def __init__(self, max_score: float, bins: int = DEFAULT_BINS) -> None:
        if not (math.isfinite(max_score) and max_score > 0):
            raise ValueError(f"max_score must be a positive finite number, got {max_score}")
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        self.max_score = float(max_score)
        self.bins = int(bins)
        self._normal = np.zeros(self.bins, dtype=np.int64)
        self._anomalous = np.zeros(self.bins, dtype=np.int64)
        self._region_mass = np.zeros(self.bins, dtype=np.float64)
        self._n_images = 0
        self._n_regions = 0

    @property
    def n_images(self) -> int:
        """Images seen so far (good and defective)."""
        return self._n_images

    @property
    def n_regions(self) -> int:
        """Connected ground-truth regions seen so far: the denominator of PRO."""
        return self._n_regions

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulator, for sizing how many categories a driver can evaluate at once."""
        return self._normal.nbytes + self._anomalous.nbytes + self._region_mass.nbytes

    def update(self, anomaly_map: np.ndarray, mask: np.ndarray | None) -> None:
        """Add one image: its ``(H, W)`` map and mask (``> 0`` anomalous; None for a good image)."""
        anomaly_map = np.asarray(anomaly_map)
        if anomaly_map.ndim != 2:
            raise ValueError(f"anomaly map must be 2-D (H, W), got shape {anomaly_map.shape}")
        mask = np.zeros(anomaly_map.shape, dtype=bool) if mask is None else np.asarray(mask) > 0
        _check_map(anomaly_map, mask)
        scaled = (anomaly_map.astype(np.float64).ravel() / self.max_score) ** (1.0 / _SPACING_POWER)
        pixel_bin = np.minimum((scaled * self.bins).astype(np.int64), self.bins - 1)
        anomalous = mask.ravel()
        weights, count = _region_weights(mask)
        self._normal += np.bincount(pixel_bin[~anomalous], minlength=self.bins)
        self._anomalous += np.bincount(pixel_bin[anomalous], minlength=self.bins)
        self._region_mass += np.bincount(pixel_bin[anomalous], weights=weights.ravel()[anomalous], minlength=self.bins)
        self._n_images += 1
        self._n_regions += count

    def pixel_auroc(self) -> float:
        """Pixel AUROC over all pixels seen; NaN until both normal and anomalous pixels were seen."""
        n_normal, n_anomalous = int(self._normal.sum()), int(self._anomalous.sum())
        if n_normal == 0 or n_anomalous == 0:
            return math.nan
        normal_below = np.cumsum(self._normal) - self._normal
        wins = self._anomalous.astype(np.float64) @ (normal_below + 0.5 * self._normal)
        return float(wins / (float(n_normal) * float(n_anomalous)))

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Normalised area under PRO over FPR up to ``fpr_limit``; NaN without regions or normal pixels."""
        _check_fpr_limit(fpr_limit)
        fpr, pro = self._pro_curve()
        return _pro_integral(fpr, pro, fpr_limit) if fpr.size else math.nan

    def binning_error_bounds(self, fpr_limit: float = 0.3) -> tuple[float, float]:
        """Guaranteed bounds on |binned - exact| for (pixel AUROC, AUPRO); NaN where the metric is NaN.

        AUROC: only normal/anomalous pairs sharing a bin may be misordered, each worth 1/2 in either
        direction. AUPRO: inside one bin the exact curve is monotone between the two bin-edge points, which
        the binned curve joins with a straight segment; the worst case is a step at the bin's left edge,
        off by ``dPRO * w * (1 - w / (2 * dFPR))`` over the width ``w`` of the bin below ``fpr_limit``
        (half the box for a bin entirely below it). Both bounds are attained by adversarial data.
        """
        _check_fpr_limit(fpr_limit)
        n_normal, n_anomalous = int(self._normal.sum()), int(self._anomalous.sum())
        auroc_bound = math.nan
        if n_normal and n_anomalous:
            shared_pairs = float(self._normal.astype(np.float64) @ self._anomalous)
            auroc_bound = shared_pairs / (2.0 * n_normal * n_anomalous)
        fpr, pro = self._pro_curve()
        if not fpr.size:
            return auroc_bound, math.nan
        step = np.diff(fpr)
        width = np.clip(fpr_limit - fpr[:-1], 0.0, step)
        covered = np.divide(width, step, out=np.zeros_like(step), where=step > 0)
        worst = width * np.diff(pro) * (1.0 - 0.5 * covered)
        return auroc_bound, float(np.sum(worst) / fpr_limit)

    def _pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) at every bin's lower edge from the top bin down, after (0, 0); empty when undefined."""
        n_normal = int(self._normal.sum())
        if n_normal == 0 or self._n_regions == 0:
            return np.empty(0), np.empty(0)
        fpr = np.cumsum(self._normal[::-1]) / n_normal
        pro = np.cumsum(self._region_mass[::-1]) / self._n_regions
        return np.append(0.0, fpr), np.append(0.0, pro)
