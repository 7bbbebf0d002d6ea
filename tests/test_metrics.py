"""Metrics against sklearn and brute-force definitions; streaming pixel metrics against the exact ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

from stfpm_ray.evaluate.metrics import PixelMetrics, aupro_exact, f1_max, image_auroc, roc_curve_points


def realistic_maps(seed: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """STFPM-like maps: product of three smooth noisy levels (strides 4/8/16) raised over blob defects.

    Heavy-tailed like real maps: normal pixels lie orders of magnitude below the strongest defects, and
    some good regions carry hot spots so that AUPRO is well below 1.
    """
    rng = np.random.default_rng(seed)
    maps = np.empty((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        if rng.random() < 0.6:
            sigma = size * rng.uniform(0.02, 0.08)
            noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
            masks[i] = noise > np.quantile(noise, 1 - rng.uniform(0.002, 0.08))
        strength = rng.lognormal(0.0, 1.0)
        product = np.ones((size, size))
        for stride in (4, 8, 16):
            cells = size // stride
            level = ndimage.gaussian_filter(rng.gamma(2.0, 0.02, (cells, cells)), 1.0) * rng.lognormal(0, 0.3)
            hot_spots = (rng.random((cells, cells)) < 0.01).astype(float)
            level += 0.3 * rng.lognormal(0, 1) * ndimage.gaussian_filter(hot_spots, 1.0)
            defect = masks[i].reshape(cells, stride, cells, stride).mean(axis=(1, 3))
            level += strength * 0.3 * ndimage.gaussian_filter(defect, 0.7)
            product *= ndimage.zoom(level, stride, order=1)
        maps[i] = product
    return maps, masks


# ----------------------------------------------------------------------------------------------------------
# Image metrics


def test_image_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding creates ties across classes
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("label", [0, 1])
def test_image_auroc_is_nan_with_one_class(label: int) -> None:
    assert math.isnan(image_auroc(np.full(5, label), np.arange(5.0)))


def brute_force_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for threshold in np.unique(scores):
        tp = fp = fn = 0
        for label, score in zip(labels, scores):
            predicted = score >= threshold
            tp += int(predicted and label == 1)
            fp += int(predicted and label == 0)
            fn += int(not predicted and label == 1)
        if tp:
            precision, recall = tp / (tp + fp), tp / (tp + fn)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_brute_force_sweep(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = rng.integers(0, 12, 60) + 3 * labels * rng.random(60).round(1)  # many ties
    best, threshold = f1_max(labels, scores)
    assert best == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)
    predicted = scores >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(best, abs=1e-12)


def test_f1_max_perfect_separation_and_no_positives() -> None:
    assert f1_max(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.7, 0.9])) == (1.0, 0.7)
    assert all(math.isnan(v) for v in f1_max(np.zeros(4), np.arange(4.0)))


def test_roc_curve_points_match_sklearn_and_are_empty_for_one_class() -> None:
    rng = np.random.default_rng(1)
    labels, scores = rng.integers(0, 2, 50), rng.random(50)
    fpr, tpr = roc_curve_points(labels, scores)
    expected_fpr, expected_tpr, _ = roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr, expected_fpr)
    np.testing.assert_array_equal(tpr, expected_tpr)
    assert all(a.size == 0 for a in roc_curve_points(np.ones(3), np.arange(3.0)))


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1], [0.1, 0.2, 0.3], "differ in length"),
        ([0, 2], [0.1, 0.2], "0 \\(normal\\) or 1"),
        ([0, 1], [0.1, np.nan], "finite"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([], [], "empty"),
    ],
)
def test_image_metrics_reject_bad_input(labels: list, scores: list, message: str) -> None:
    for metric in (image_auroc, f1_max, roc_curve_points):
        with pytest.raises(ValueError, match=message):
            metric(np.array(labels), np.array(scores))


# ----------------------------------------------------------------------------------------------------------
# Exact AUPRO


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """The definition read literally: each distinct score a threshold, regions and FPR counted directly."""
    regions = []  # (image index, boolean region mask)
    for image, mask in enumerate(masks > 0):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image, labelled == k) for k in range(1, count + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for threshold in sorted(set(maps.ravel().tolist()), reverse=True):
        fpr = np.sum((maps >= threshold) & normal) / np.sum(normal)
        overlaps = [np.sum(maps[image][region] >= threshold) / np.sum(region) for image, region in regions]
        points.append((fpr, float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def test_aupro_exact_hand_computed() -> None:
    # Two single-pixel regions (pixels 0 and 2 are not adjacent); pixel 2 ties with the normal pixel 1.
    # Curve: (0,0) -> (0,0.5) at t=4 -> (0.5,1) at t=2 -> (1,1). At FPR 0.3: PRO 0.8; area 0.3*(0.5+0.8)/2.
    maps = np.array([[[4.0, 2.0, 2.0, 1.0]]])
    masks = np.array([[[1, 0, 1, 0]]])
    assert aupro_exact(maps, masks, 0.3) == pytest.approx(0.195 / 0.3, abs=1e-12)
    assert aupro_exact(maps, masks, 1.0) == pytest.approx((0.5 * 0.75 + 0.5 * 1.0) / 1.0, abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # (0,0) and (1,1) touch diagonally: one region of area 2 (half detected) plus region (3,3) (missed):
    # PRO = (1/2 + 0) / 2 = 0.25 from FPR 0 on. With 4-connectivity it would be (1 + 0 + 0) / 3.
    maps = np.ones((1, 4, 4))
    masks = np.zeros((1, 4, 4), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = 1
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 3, 3] = 3.0, 0.0, 0.0
    assert aupro_exact(maps, masks) == pytest.approx(0.25, abs=1e-12)
    metrics = PixelMetrics(max_score=3.0)
    metrics.update(maps[0], masks[0])
    assert metrics.n_regions == 2


def test_aupro_exact_matches_brute_force_on_two_6x6_images() -> None:
    masks = np.zeros((2, 6, 6), dtype=np.uint8)
    masks[0, 1:3, 1:4] = 1  # 6-pixel block
    masks[0, 4, 5] = 1  # single pixel
    masks[1, 0:4, 0] = 1  # 4-pixel line
    masks[1, 3:6, 3:5] = 1  # 6-pixel block
    rng = np.random.default_rng(7)
    maps = rng.integers(0, 8, (2, 6, 6)).astype(float) + 3 * masks * rng.integers(0, 2, (2, 6, 6))
    for limit in (0.05, 0.3, 0.5, 1.0):
        expected = brute_force_aupro(maps, masks, limit)
        assert aupro_exact(maps, masks, limit) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_exact_matches_brute_force_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = (ndimage.gaussian_filter(rng.random((3, 10, 10)), (0, 1, 1)) > 0.55).astype(np.uint8)
    maps = rng.random((3, 10, 10)).round(2) + 0.3 * masks
    assert aupro_exact(maps, masks) == pytest.approx(brute_force_aupro(maps, masks, 0.3), abs=1e-12)


def test_aupro_exact_perfect_and_constant_maps() -> None:
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 2:5, 2:5] = 1
    masks[1, 6:, :3] = 1
    assert aupro_exact(masks.astype(float), masks) == pytest.approx(1.0, abs=1e-12)
    # A constant map ties everything: the curve is the diagonal, so the normalised area is limit / 2.
    for limit in (0.3, 1.0):
        assert aupro_exact(np.full(masks.shape, 0.7), masks, limit) == pytest.approx(limit / 2, abs=1e-12)


def test_aupro_exact_is_nan_without_regions_and_validates() -> None:
    assert math.isnan(aupro_exact(np.ones((2, 4, 4)), np.zeros((2, 4, 4))))
    with pytest.raises(ValueError, match="differs from mask shape"):
        aupro_exact(np.ones((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="\\(N, H, W\\)"):
        aupro_exact(np.ones((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro_exact(np.ones((1, 4, 4)), np.zeros((1, 4, 4)), fpr_limit=0.0)


# ----------------------------------------------------------------------------------------------------------
# Streaming pixel metrics


@pytest.fixture(scope="module")
def realistic() -> tuple[np.ndarray, np.ndarray, float, float]:
    maps, masks = realistic_maps(seed=0, n=16, size=128)
    return maps, masks, roc_auc_score(masks.ravel() > 0, maps.ravel()), aupro_exact(maps, masks)


def fed(maps: np.ndarray, masks: np.ndarray, max_score: float, **kwargs: int) -> PixelMetrics:
    metrics = PixelMetrics(max_score, **kwargs)
    for anomaly_map, mask in zip(maps, masks):
        metrics.update(anomaly_map, mask)
    return metrics


@pytest.mark.parametrize("looseness", [1.0, 100.0])
def test_pixel_metrics_match_exact_on_realistic_maps(realistic: tuple, looseness: float) -> None:
    maps, masks, exact_auroc, exact_aupro = realistic
    assert 0.9 < exact_auroc < 0.999 and 0.5 < exact_aupro < 0.95  # a regime where binning errors would show
    metrics = fed(maps, masks, float(maps.max()) * looseness)
    auroc_bound, aupro_bound = metrics.binning_error_bounds()
    assert auroc_bound < 1e-3 and aupro_bound < 1e-3
    assert abs(metrics.pixel_auroc() - exact_auroc) <= min(auroc_bound + 1e-12, 1e-4)
    assert abs(metrics.aupro() - exact_aupro) <= min(aupro_bound + 1e-12, 1e-4)
    assert metrics.n_images == len(maps)
    assert metrics.n_regions == sum(ndimage.label(m, np.ones((3, 3)))[1] for m in masks)


@pytest.mark.parametrize("max_fraction", [0.02, 1.0])
def test_binning_error_bounds_hold_for_coarse_bins(realistic: tuple, max_fraction: float) -> None:
    # 16 bins, and a max_score far below the largest scores (most anomalous pixels clipped into the top
    # bin): the metrics are visibly off, and the stated bounds must still contain the truth.
    maps, masks, exact_auroc, exact_aupro = realistic
    metrics = fed(maps, masks, float(maps.max()) * max_fraction, bins=16)
    auroc_bound, aupro_bound = metrics.binning_error_bounds()
    auroc_error, aupro_error = abs(metrics.pixel_auroc() - exact_auroc), abs(metrics.aupro() - exact_aupro)
    assert auroc_error <= auroc_bound + 1e-12 and aupro_error <= aupro_bound + 1e-12
    assert max(auroc_error, aupro_error) > 1e-4


def test_binning_error_bounds_are_attained_by_adversarial_data() -> None:
    # Every pixel falls into the top bin, all anomalous pixels above all normal ones: exactly separable
    # (both metrics 1), binned as one tie (AUROC 1/2, curve on the diagonal: AUPRO limit / 2).
    anomaly_map = np.full((4, 4), 0.6)
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2, :2] = 1
    anomaly_map[mask > 0] = 0.9
    metrics = PixelMetrics(max_score=1.0, bins=2)
    metrics.update(anomaly_map, mask)
    auroc_bound, aupro_bound = metrics.binning_error_bounds()
    assert aupro_exact(anomaly_map[None], mask[None]) == 1.0
    assert (metrics.pixel_auroc(), metrics.aupro()) == pytest.approx((0.5, 0.15), abs=1e-12)
    assert (auroc_bound, aupro_bound) == pytest.approx((0.5, 0.85), abs=1e-12)


def test_fpr_limit_is_honoured(realistic: tuple) -> None:
    maps, masks, _, _ = realistic
    metrics = fed(maps, masks, float(maps.max()))
    for limit in (0.05, 1.0):
        assert metrics.aupro(limit) == pytest.approx(aupro_exact(maps, masks, limit), abs=1e-3)


def test_update_without_mask_equals_all_zero_mask() -> None:
    maps, masks = realistic_maps(seed=3, n=3, size=64)
    with_none, with_zeros = PixelMetrics(float(maps.max())), PixelMetrics(float(maps.max()))
    with_none.update(maps[0], None)
    with_zeros.update(maps[0], np.zeros_like(masks[0]))
    for metrics in (with_none, with_zeros):
        metrics.update(maps[1], np.pad(np.ones((8, 8)), 28))  # one defect so that both metrics are defined
    assert with_none.pixel_auroc() == with_zeros.pixel_auroc()
    assert with_none.aupro() == with_zeros.aupro()
    assert (with_none.n_images, with_none.n_regions) == (with_zeros.n_images, with_zeros.n_regions) == (2, 1)


def test_pixel_metrics_are_nan_until_defined() -> None:
    metrics = PixelMetrics(1.0)
    assert math.isnan(metrics.pixel_auroc()) and math.isnan(metrics.aupro())
    metrics.update(np.full((4, 4), 0.5), None)
    assert math.isnan(metrics.pixel_auroc()) and math.isnan(metrics.aupro())
    assert all(math.isnan(b) for b in metrics.binning_error_bounds())


def test_memory_is_independent_of_pixels() -> None:
    rng = np.random.default_rng(0)
    metrics = PixelMetrics(max_score=10.0)
    before = metrics.nbytes
    base = rng.gamma(2.0, 0.05, (256, 256)).astype(np.float32)
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[::16, ::16] = 1  # 256 regions per image: 51,200 regions in all
    for i in range(200):
        metrics.update(np.roll(base, i, axis=0), mask if i % 2 else None)
    state_bytes = sum(v.nbytes for v in vars(metrics).values() if isinstance(v, np.ndarray))
    assert state_bytes == metrics.nbytes == before
    assert state_bytes < 50e6 / 10
    assert metrics.n_images == 200 and metrics.n_regions == 100 * 256


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PixelMetrics(-1.0), "positive finite"),
        (lambda: PixelMetrics(0.0), "positive finite"),
        (lambda: PixelMetrics(math.nan), "positive finite"),
        (lambda: PixelMetrics(1.0, bins=1), "at least 2"),
        (lambda: PixelMetrics(1.0).update(np.zeros((4, 4)), np.zeros((4, 5))), "differs from mask shape"),
        (lambda: PixelMetrics(1.0).update(np.zeros((1, 4, 4)), None), "2-D"),
        (lambda: PixelMetrics(1.0).update(np.full((4, 4), np.nan), None), "NaN or inf"),
        (lambda: PixelMetrics(1.0).update(np.full((4, 4), -0.1), None), "negative"),
        (lambda: PixelMetrics(1.0).aupro(fpr_limit=1.5), "fpr_limit"),
    ],
)
def test_pixel_metrics_reject_bad_input(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
