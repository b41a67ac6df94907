"""Intensity models shared by the weight-free propagators: feature images, histograms, log-likelihood ratios.

CT in HU is mapped piecewise-linearly so that lung, fat, soft tissue and bone all stay
distinguishable; anything else gets the percentile normalisation used for MR.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from models.preprocess import (
    normalise_percentiles,
    percentile_bounds,
    scale_to_bounds,
)

N_BINS = 64
SMOOTH_PX = 0.7  # Gaussian sigma before intensity modelling: takes the edge off CT/MR noise
RING_MM = 10.0  # width of the "surroundings" ring of the intensity model


def feature_image(image: np.ndarray, modality: str) -> np.ndarray:
    """Intensities mapped to [0, 1]: CT piecewise-linear in HU, anything else by percentiles.

    CT: -1000..-160 HU -> 0..0.2 (air, lung, fat), -160..240 -> 0.2..0.8 (soft tissue at full
    resolution), 240..1500 -> 0.8..1 (bone), so a plain soft-tissue window does not merge lung
    with fat or cortical with cancellous bone.
    """
    image = np.asarray(image, dtype=np.float32)
    if modality.upper() == "CT":
        return np.interp(image, [-1000.0, -160.0, 240.0, 1500.0], [0.0, 0.2, 0.8, 1.0]).astype(np.float32)
    return normalise_percentiles(image)


def slice_features(image: np.ndarray, modality: str) -> Callable[[int], np.ndarray]:
    """Slice z -> its feature image (as `feature_image`), smoothed in 2D, computed on first use.

    A propagation visits only the structure's slices, so the rest of the volume is never mapped.
    MR percentiles are still taken over the whole volume, so every slice is scaled alike.
    """
    bounds = None if modality.upper() == "CT" else percentile_bounds(image)
    cache: dict[int, np.ndarray] = {}

    def features(z: int) -> np.ndarray:
        if z not in cache:
            raw = np.asarray(image[z], dtype=np.float32)
            mapped = feature_image(raw, "CT") if bounds is None else scale_to_bounds(raw, *bounds)
            cache[z] = ndimage.gaussian_filter(mapped, SMOOTH_PX)  # 2D only: slices may be far apart
        return cache[z]

    return features


def histogram(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Smoothed, floored intensity histogram (a density over N_BINS bins of [0, 1])."""
    h, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=N_BINS, range=(0.0, 1.0), weights=weights)
    h = ndimage.gaussian_filter1d(h.astype(np.float64), 1.5)
    h += 1e-3 * max(h.sum(), 1.0) / N_BINS  # unseen intensities are unlikely, not impossible
    return h / h.sum()


def _bins(image: np.ndarray) -> np.ndarray:
    """Histogram bin of each [0, 1] feature value."""
    return np.clip((image * N_BINS).astype(np.intp), 0, N_BINS - 1)


def llr(image: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Log-likelihood ratio structure (fg) vs surroundings (bg), per pixel, from two `histogram`s."""
    b = _bins(image)
    return np.log(fg[b]) - np.log(bg[b])


def ring_around(mask: np.ndarray, spacing_yx: tuple[float, float], width_mm: float = RING_MM) -> np.ndarray:
    """The band up to `width_mm` around the mask (distances computed on the mask's neighbourhood only)."""
    ring = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return ring
    pad = (int(np.ceil(width_mm / spacing_yx[0])) + 1, int(np.ceil(width_mm / spacing_yx[1])) + 1)
    ys, xs = np.nonzero(mask)
    rows = slice(max(0, ys.min() - pad[0]), ys.max() + pad[0] + 1)
    cols = slice(max(0, xs.min() - pad[1]), xs.max() + pad[1] + 1)
    d = ndimage.distance_transform_edt(~mask[rows, cols], sampling=spacing_yx)
    ring[rows, cols] = (d > 0) & (d <= width_mm)
    return ring


def ring_contrast(feature2d: np.ndarray, mask: np.ndarray, spacing_yx: tuple[float, float]) -> float:
    """|mean inside - mean of the ring around| / pooled SD: how clearly a 2D region stands out."""
    inside, around = feature2d[mask], feature2d[ring_around(mask, spacing_yx)]
    if inside.size < 2 or around.size < 2:
        return 0.0
    return float(abs(inside.mean() - around.mean()) / np.sqrt(0.5 * (inside.var() + around.var()) + 1e-6))
