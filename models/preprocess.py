"""Model input preprocessing: intensities to [0, 1] as the SAM2/MedSAM2 seeds do it (CT window, MR percentiles)."""
from __future__ import annotations

import numpy as np


def window_ct(hu: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """Clip HU to [level - width/2, level + width/2] and scale to [0, 1] (default soft tissue 40/400)."""
    lo, hi = level - width / 2.0, level + width / 2.0
    return ((np.clip(np.asarray(hu, dtype=np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


def percentile_bounds(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """The [low, high] percentiles of the voxels above the image's minimum (the background)."""
    image = np.asarray(image, dtype=np.float32)
    values = image[image > image.min()] if np.any(image > image.min()) else image.ravel()
    lo, hi = np.percentile(values, [low, high])
    return float(lo), float(hi)


def scale_to_bounds(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi] and scale to [0, 1] (all zeros if the bounds are empty)."""
    image = np.asarray(image, dtype=np.float32)
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalise_percentiles(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the [low, high] percentiles of the non-zero voxels and scale to [0, 1] (MR)."""
    return scale_to_bounds(image, *percentile_bounds(image, low, high))


def normalise(image: np.ndarray, modality: str, level: float = 40.0, width: float = 400.0,
              percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """CT gets the window, anything else (MR, unknown) the percentile normalisation."""
    if modality.upper() == "CT":
        return window_ct(image, level, width)
    return normalise_percentiles(image, *percentiles)
