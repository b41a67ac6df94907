"""2D mask <-> planar polygons in continuous voxel-index coordinates (column x, row y).

Pixel-centre convention: pixel (row r, column c) is the unit square centred on (x=c, y=r).

- `mask_to_polygons` traces the 0.5 iso-line of the mask (marching squares), so every polygon
  passes half-way between a foreground and a background pixel centre: each foreground centre is
  strictly inside, each background centre strictly outside. Inner boundaries (holes) come out as
  separate polygons; the set is meant to be combined with the even-odd (XOR) rule, which is how
  DICOM CLOSED_PLANAR contours on one slice combine. Single pixels give a 4-point diamond, never
  fewer than 3 points.
- `polygons_to_mask` fills with the even-odd rule and counts pixel centres lying on a polygon's
  edge as inside that polygon, so contours drawn through the centres of a mask's boundary pixels
  (as many TPSs and cv2.findContours do) give back that mask, and iso-line contours give back
  exactly the mask they were traced from.
"""
from __future__ import annotations

import numpy as np
from skimage import measure

EDGE_EPS = 1e-6  # in pixels: a centre this close to an edge is on it


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove vertices lying on the straight line between their neighbours (exact: shape unchanged)."""
    if len(points) <= 4:
        return points
    prev = np.roll(points, 1, axis=0)
    nxt = np.roll(points, -1, axis=0)
    cross = (points[:, 0] - prev[:, 0]) * (nxt[:, 1] - prev[:, 1]) - (points[:, 1] - prev[:, 1]) * (nxt[:, 0] - prev[:, 0])
    keep = np.abs(cross) > 1e-9
    if keep.sum() < 3:
        return points
    return points[keep]


def mask_to_polygons(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (each (N, 2) float, columns x=column, y=row, N >= 3, not repeating the first
    point) whose even-odd combination is exactly `mask2d` under `polygons_to_mask`."""
    mask2d = np.asarray(mask2d, dtype=bool)
    if not mask2d.any():
        return []
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    r0, c0 = rows[0], cols[0]
    crop = mask2d[r0:rows[-1] + 1, c0:cols[-1] + 1]
    padded = np.pad(crop, 1).astype(np.float32)
    polygons = []
    # fully_connected="low": foreground is 4-connected, so diagonal neighbours give separate
    # closed polygons rather than one self-touching outline.
    for contour in measure.find_contours(padded, 0.5, fully_connected="low"):
        if len(contour) < 4 or not np.allclose(contour[0], contour[-1]):
            continue  # open contours cannot occur on a zero-padded mask; guard anyway
        rc = contour[:-1] - 1.0 + np.array([r0, c0])  # undo the padding and the crop
        xy = np.ascontiguousarray(rc[:, ::-1])
        xy = _drop_collinear(xy)
        if len(xy) >= 3:
            polygons.append(xy)
    return polygons


def _fill_even_odd(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre is strictly inside the closed polygon (even-odd; edge centres undecided)."""
    ny, nx = shape
    out = np.zeros(shape, dtype=bool)
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    ymin, ymax = max(int(np.ceil(y0.min())), 0), min(int(np.floor(y0.max())), ny - 1)
    if ymin > ymax:
        return out
    rows = np.arange(ymin, ymax + 1, dtype=float)
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # half-open rule [lo, hi): each crossing of a scanline counted once, horizontal edges never
    crosses = (rows[:, None] >= lo[None, :]) & (rows[:, None] < hi[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (rows[:, None] - y0[None, :]) / (y1 - y0)[None, :]
        xs = np.where(crosses, x0[None, :] + t * (x1 - x0)[None, :], np.inf)
        xs.sort(axis=1)
    counts = crosses.sum(axis=1)
    width = int(counts.max()) if counts.size else 0
    width -= width % 2
    if width == 0:
        return out
    xs = xs[:, :width]
    starts, ends = xs[:, 0::2], xs[:, 1::2]
    valid = np.isfinite(ends)  # rows with fewer crossings are padded with inf
    c0 = np.clip(np.ceil(starts), 0, nx)
    c1 = np.clip(np.floor(ends) + 1, 0, nx)
    valid &= c1 > c0
    row_idx = np.broadcast_to(np.arange(len(rows))[:, None], starts.shape)
    diff = np.zeros((len(rows), nx + 1), dtype=np.int32)
    np.add.at(diff, (row_idx[valid], c0[valid].astype(int)), 1)
    np.add.at(diff, (row_idx[valid], c1[valid].astype(int)), -1)
    out[ymin:ymax + 1] = np.cumsum(diff, axis=1)[:, :nx] > 0
    return out


def _edge_centres(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies on an edge of the closed polygon (within EDGE_EPS)."""
    ny, nx = shape
    out = np.zeros(shape, dtype=bool)
    xa, ya = xy[:, 0], xy[:, 1]
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    dx, dy = xb - xa, yb - ya
    cand_x, cand_y = [xa], [ya]  # the vertices themselves (covers degenerate edges)
    for major_is_y in (True, False):
        sel = (np.abs(dy) >= np.abs(dx)) if major_is_y else (np.abs(dy) < np.abs(dx))
        a0, a1 = (ya, yb) if major_is_y else (xa, xb)
        sel &= np.abs(a1 - a0) >= EDGE_EPS
        if not sel.any():
            continue
        lo = np.ceil(np.minimum(a0, a1)[sel] - EDGE_EPS)
        hi = np.floor(np.maximum(a0, a1)[sel] + EDGE_EPS)
        n = np.maximum(hi - lo + 1, 0).astype(int)
        if n.sum() == 0:
            continue
        edge = np.repeat(np.flatnonzero(sel), n)
        offset = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        major = np.repeat(lo, n) + offset
        if major_is_y:
            minor = xa[edge] + (major - ya[edge]) / dy[edge] * dx[edge]
            cand_x.append(minor)
            cand_y.append(major)
        else:
            minor = ya[edge] + (major - xa[edge]) / dx[edge] * dy[edge]
            cand_x.append(major)
            cand_y.append(minor)
    x, y = np.concatenate(cand_x), np.concatenate(cand_y)
    rx, ry = np.round(x), np.round(y)
    on = (np.abs(x - rx) <= EDGE_EPS) & (np.abs(y - ry) <= EDGE_EPS) & (rx >= 0) & (rx < nx) & (ry >= 0) & (ry < ny)
    out[ry[on].astype(int), rx[on].astype(int)] = True
    return out


def polygon_to_mask(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels of `shape` (rows, columns) whose centre is inside or on the closed polygon `xy` (N, 2: x, y)."""
    xy = np.asarray(xy, dtype=float)
    out = np.zeros(shape, dtype=bool)
    if len(xy) == 0:
        return out
    # work in the polygon's bounding box only
    c0 = max(int(np.floor(xy[:, 0].min())) - 1, 0)
    r0 = max(int(np.floor(xy[:, 1].min())) - 1, 0)
    c1 = min(int(np.ceil(xy[:, 0].max())) + 2, shape[1])
    r1 = min(int(np.ceil(xy[:, 1].max())) + 2, shape[0])
    if c0 >= c1 or r0 >= r1:
        return out
    local = xy - np.array([c0, r0])
    sub = (r1 - r0, c1 - c0)
    part = _edge_centres(local, sub)
    if len(xy) >= 3:  # degenerate (point/segment): only the centres it touches
        part |= _fill_even_odd(local, sub)
    out[r0:r1, c0:c1] = part
    return out


def polygons_to_mask(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd (XOR) combination of closed polygons on one slice: a polygon inside another is a hole."""
    out = np.zeros(shape, dtype=bool)
    for xy in polygons:
        out ^= polygon_to_mask(xy, shape)
    return out
