"""Images for the review page: a CT/MR slice or a sagittal/coronal reconstruction, windowed, as PNG;
and the RTSTRUCT's contours as polygons the page draws over the slice.

The contour is drawn where the RTSTRUCT says it is: each ContourData point (patient mm) goes through
the series' geometry (`Geometry.patient_to_index`, which uses ImageOrientationPatient, not origin +
spacing alone) to a continuous (column, row, slice) index, and the polygon is drawn on the slice
that index falls on. No mask array is involved, so what the reviewer sees on the slice is what the
TPS will get. The page draws these polygons as vector graphics over the slice image (voxel (c, r)
covers [c - 0.5, c + 0.5] x [r - 0.5, r + 0.5] of index space), so they stay sharp at any zoom.

Sagittal and coronal reconstructions are resampled to square pixels (the in-plane pixel spacing),
superior at the top; there each ROI is drawn as the outline of its mask on that plane.

Speed: a series is decoded once and kept (LRU of `web.volume_cache_series` series, CT as int16);
one request windows one plane and encodes a PNG.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from converters.geometry import Geometry, Volume

# (level, width) in HU; MR gets its own percentiles.
WINDOWS: dict[str, tuple[float, float]] = {"soft": (40.0, 400.0), "lung": (-600.0, 1500.0),
                                           "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}
SOURCE_COLOUR = (0, 255, 255)  # RGB cyan: the prompt / original contour, beside the result's own colour
DEFAULT_COLOUR = (255, 128, 0)
PLANES = {"sagittal": 2, "coronal": 1}  # the array axis a plane is perpendicular to


@dataclass
class SeriesImage:
    """One decoded series: pixel values (z, y, x), geometry, modality, MR display range."""

    array: np.ndarray
    geometry: Geometry
    modality: str
    auto_window: tuple[float, float]  # (level, width) from the 0.5/99.5 percentiles
    positions_mm: list[float]  # slice position along the normal, per index
    header: Any = None
    volume: Volume | None = None  # the series as converters read it (array shared), for corrections

    @property
    def superior_last(self) -> bool:
        """Do slice positions grow with the index (then the last slice is drawn at the top of a reconstruction)?"""
        return len(self.positions_mm) < 2 or self.positions_mm[-1] >= self.positions_mm[0]


@dataclass
class Overlay:
    """Contours of one ROI, per slice: polygons as (N, 2) continuous (column, row) indices."""

    name: str
    colour: tuple[int, int, int]
    polygons: dict[int, list[np.ndarray]] = field(default_factory=dict)
    points: dict[int, list[np.ndarray]] = field(default_factory=dict)
    source: bool = False  # the prompt / original contour rather than the result


def load_series(folder: Path, series_uid: str) -> SeriesImage:
    from converters.series import read_series

    volume = read_series(folder, series_uid)
    data = volume.array
    if volume.modality.upper() == "CT" and data.min() >= -32768 and data.max() <= 32767 \
            and np.array_equal(data, np.round(data)):
        data = data.astype(np.int16)  # HU are integers: half the memory of float32
    sample = data[:: max(1, data.shape[0] // 32)]
    lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    k = np.arange(data.shape[0], dtype=float)
    centres = volume.geometry.index_to_patient(np.stack([np.zeros_like(k), np.zeros_like(k), k], axis=1))
    normal = volume.geometry.direction_matrix[:, 2]
    return SeriesImage(array=data, geometry=volume.geometry, modality=volume.modality,
                       auto_window=((lo + hi) / 2, max(hi - lo, 1.0)),
                       positions_mm=[round(float(v), 2) for v in centres @ normal], header=volume.header,
                       volume=replace(volume, array=data))


def rtstruct_overlays(path: Path, geometry: Geometry, *, only: set[str] | None = None,
                      source: bool = False) -> list[Overlay]:
    """Every ROI of the RTSTRUCT at `path` (or those named in `only`) as polygons per slice of `geometry`."""
    from converters.rtstruct_read import read_rtstruct

    structure_set = read_rtstruct(path)  # no volume: ContourData as written, nothing rasterised
    nz = geometry.shape_zyx[0]
    out = []
    for roi in structure_set.rois:
        if only is not None and roi.name not in only:
            continue
        colour = SOURCE_COLOUR if source else (roi.color or DEFAULT_COLOUR)
        overlay = Overlay(roi.name, tuple(int(c) for c in colour), source=source)
        for pts, gtype in zip(roi.contours_mm, roi.geometric_types):
            ijk = geometry.patient_to_index(pts)
            k = int(round(float(ijk[:, 2].mean())))
            if not 0 <= k < nz:
                continue
            (overlay.points if gtype == "POINT" else overlay.polygons).setdefault(k, []).append(ijk[:, :2])
        out.append(overlay)
    return out


def window(image: SeriesImage, preset: str = "", level: float | None = None,
           width: float | None = None) -> tuple[float, float]:
    """(level, width): given numbers win; else a CT preset (`WINDOWS`), or "auto" (the series' percentiles,
    always for MR)."""
    if level is not None and width is not None:
        return float(level), max(float(width), 1.0)
    if preset == "auto" or image.modality.upper() != "CT":
        return image.auto_window
    return WINDOWS.get(preset, WINDOWS["soft"])


def _grey(plane: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2
    return np.clip((plane.astype(np.float32) - lo) * (255.0 / width), 0, 255).astype(np.uint8)


def _png(image: np.ndarray, what: str) -> bytes:
    ok, png = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"PNG encoding of {what} failed")
    return png.tobytes()


def render_slice(image: SeriesImage, z: int, level: float, width: float) -> bytes:
    """PNG bytes of axial slice `z`, windowed, one pixel per voxel (the page draws the contours over it)."""
    if not 0 <= z < image.array.shape[0]:
        raise IndexError(f"slice {z} is outside 0..{image.array.shape[0] - 1}")
    return _png(_grey(image.array[z], level, width), f"slice {z}")


def plane_shape(image: SeriesImage, plane: str) -> tuple[int, int]:
    """(height, width) in pixels of a reconstruction: slices stretched to the in-plane pixel spacing."""
    nz, ny, nx = image.array.shape
    sx, sy, sz = image.geometry.spacing_mm
    along = sy if plane == "sagittal" else sx
    return max(1, int(round(nz * sz / along))), (ny if plane == "sagittal" else nx)


def render_plane(image: SeriesImage, plane: str, index: int, level: float, width: float,
                 outlines: list[tuple[tuple[int, int, int], np.ndarray]]) -> bytes:
    """PNG of the sagittal (column `index`) or coronal (row `index`) plane with each (RGB colour, (z, ·) mask)
    of `outlines` drawn as the mask's outline; superior at the top, square pixels."""
    axis = PLANES[plane]
    size = image.array.shape[axis]
    if not 0 <= index < size:
        raise IndexError(f"{plane} plane {index} is outside 0..{size - 1}")
    height, width_px = plane_shape(image, plane)
    flip = image.superior_last

    def fit(a: np.ndarray, interpolation: int) -> np.ndarray:
        a = cv2.resize(a, (width_px, height), interpolation=interpolation)
        return a[::-1] if flip else a

    grey = fit(_grey(np.take(image.array, index, axis=axis), level, width), cv2.INTER_LINEAR)
    bgr = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    for colour, mask in outlines:
        on = fit(mask.astype(np.uint8), cv2.INTER_NEAREST)
        edge = on.astype(bool) & ~cv2.erode(on, np.ones((3, 3), np.uint8)).astype(bool)
        bgr[edge] = colour[::-1]
    return _png(bgr, f"{plane} plane {index}")


class LRU:
    """A small thread-safe least-recently-used cache whose loader runs once per key at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[Any, threading.Lock] = {}

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            value = load()
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
                self._loading.pop(key, None)
            return value
