"""Slice images for the review page: a CT/MR slice, windowed, with the RTSTRUCT's contours drawn on it.

The contour is drawn where the RTSTRUCT says it is: each ContourData point (patient mm) goes through
the series' geometry (`Geometry.patient_to_index`, which uses ImageOrientationPatient, not origin +
spacing alone) to a continuous (column, row, slice) index, and the polygon is drawn on the slice
that index falls on. No mask array is involved, so what the reviewer sees is what the TPS will get.

Display coordinates: the slice is magnified by an integer `scale` (small crops would be tiny), voxel
(c, r) covers display pixels [c*scale, (c+1)*scale); its centre is at c*scale + (scale-1)/2, and a
contour point at continuous index (x, y) is drawn at (x*scale + (scale-1)/2, y*scale + (scale-1)/2).

Speed: a series is decoded once and kept (LRU of `web.volume_cache_series` series, CT as int16);
one request windows one slice, draws its polygons (cv2, 1/16 pixel precision) and encodes a PNG.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from converters.geometry import Geometry

# (level, width) in HU; MR gets its own percentiles.
WINDOWS: dict[str, tuple[float, float]] = {"soft": (40.0, 400.0), "lung": (-600.0, 1500.0),
                                           "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}
SOURCE_COLOUR = (0, 255, 255)  # RGB cyan: the prompt / original contour, beside the result's own colour
DEFAULT_COLOUR = (255, 128, 0)
SHIFT = 4  # cv2 fixed-point bits: 1/16 pixel


@dataclass
class SeriesImage:
    """One decoded series: pixel values (z, y, x), geometry, modality, MR display range."""

    array: np.ndarray
    geometry: Geometry
    modality: str
    auto_window: tuple[float, float]  # (level, width) from the 0.5/99.5 percentiles
    positions_mm: list[float]  # slice position along the normal, per index
    header: Any = None

    @property
    def scale(self) -> int:
        return display_scale(self.array.shape[1:])


@dataclass
class Overlay:
    """Contours of one ROI, per slice: polygons as (N, 2) continuous (column, row) indices."""

    name: str
    colour: tuple[int, int, int]
    polygons: dict[int, list[np.ndarray]] = field(default_factory=dict)
    points: dict[int, list[np.ndarray]] = field(default_factory=dict)
    source: bool = False  # the prompt / original contour rather than the result


def display_scale(shape_yx: tuple[int, ...]) -> int:
    """Integer magnification so a slice shows at about 512 pixels (1 for 512x512, at most 4)."""
    return int(max(1, min(4, 512 // max(shape_yx))))


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
                       positions_mm=[round(float(v), 2) for v in centres @ normal], header=volume.header)


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


def window_slice(image: SeriesImage, z: int, window: str) -> np.ndarray:
    level, width = image.auto_window if window == "auto" or image.modality.upper() != "CT" \
        else WINDOWS.get(window, WINDOWS["soft"])
    lo = level - width / 2
    plane = image.array[z].astype(np.float32)
    return np.clip((plane - lo) * (255.0 / width), 0, 255).astype(np.uint8)


def to_display(xy: np.ndarray, scale: int) -> np.ndarray:
    """Continuous (column, row) indices -> display pixel coordinates (see the module docstring)."""
    return np.asarray(xy, dtype=float) * scale + (scale - 1) / 2.0


def render_slice(image: SeriesImage, z: int, window: str, overlays: list[Overlay]) -> bytes:
    """PNG bytes of slice `z` with every overlay's polygons (closed, 1 px) and points (crosses) drawn."""
    if not 0 <= z < image.array.shape[0]:
        raise IndexError(f"slice {z} is outside 0..{image.array.shape[0] - 1}")
    scale = image.scale
    grey = window_slice(image, z, window)
    if scale > 1:
        grey = cv2.resize(grey, (grey.shape[1] * scale, grey.shape[0] * scale), interpolation=cv2.INTER_LINEAR)
    bgr = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    for overlay in sorted(overlays, key=lambda o: not o.source):  # the result is drawn last, on top
        colour = tuple(int(c) for c in overlay.colour[::-1])
        polys = [np.round(to_display(p, scale) * (1 << SHIFT)).astype(np.int32) for p in overlay.polygons.get(z, [])]
        if polys:
            cv2.polylines(bgr, polys, isClosed=True, color=colour, thickness=1, lineType=cv2.LINE_8, shift=SHIFT)
        for pts in overlay.points.get(z, []):
            for x, y in np.round(to_display(pts, scale)).astype(int):
                cv2.drawMarker(bgr, (int(x), int(y)), colour, cv2.MARKER_CROSS, 4 + 2 * scale, 1)
    ok, png = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"PNG encoding of slice {z} failed")
    return png.tobytes()


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
