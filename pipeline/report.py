"""Drift report of a batch run: a CSV row per ROI and a PNG montage of the worst cases (matplotlib Agg)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

CSV_FIELDS = ("patient", "study_instance_uid", "series_instance_uid", "modality", "rtstruct_sop_instance_uid", "roi",
              "key_slice", "backend", "model", "dice", "hd95_mm", "msd_mm", "volume_ratio", "gt_volume_ml", "pred_volume_ml",
              "seconds", "new_rtstruct", "sent", "job", "delivery", "error")


def write_csv(rows: Iterable[dict[str, Any]], path: Path) -> int:
    """One row per ROI; numbers rounded for reading, empty cells for missing values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            out = {k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS}
            for k in ("dice", "hd95_mm", "msd_mm", "volume_ratio", "gt_volume_ml", "pred_volume_ml", "seconds"):
                if isinstance(out[k], float):
                    out[k] = f"{out[k]:.4g}" if np.isfinite(out[k]) else "inf"
            writer.writerow(out)
            n += 1
    return n


@dataclass
class MontageCase:
    title: str
    image: np.ndarray  # (z, y, x)
    original: np.ndarray  # (z, y, x) bool
    new: np.ndarray  # (z, y, x) bool
    modality: str = ""
    key_slice: int | None = None


def _window(image2d: np.ndarray, modality: str) -> tuple[float, float]:
    if modality.upper() == "CT":
        return -160.0, 240.0  # soft tissue: level 40, width 400
    lo, hi = np.percentile(image2d, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def worst_slice(original: np.ndarray, new: np.ndarray) -> int:
    """The slice where the two contours disagree most (voxels in one and not the other)."""
    diff = np.logical_xor(original, new).sum(axis=(1, 2))
    if diff.max() == 0:
        return int(np.argmax(original.sum(axis=(1, 2))))
    return int(np.argmax(diff))


def montage(cases: list[MontageCase], path: Path) -> Path:
    """One row per case: image, original contour (green), new contour (orange), both overlaid, on the slice where they
    disagree most, cropped around the structures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = max(1, len(cases))
    fig, axes = plt.subplots(rows, 4, figsize=(12, 3.2 * rows), squeeze=False)
    for r, case in enumerate(cases):
        z = worst_slice(case.original, case.new)
        img = case.image[z]
        both = case.original[z] | case.new[z]
        if both.any():
            ys, xs = np.nonzero(both)
            m = 15
            y0, y1 = max(ys.min() - m, 0), min(ys.max() + m + 1, img.shape[0])
            x0, x1 = max(xs.min() - m, 0), min(xs.max() + m + 1, img.shape[1])
        else:
            y0, y1, x0, x1 = 0, img.shape[0], 0, img.shape[1]
        vmin, vmax = _window(img, case.modality)
        crop = (slice(y0, y1), slice(x0, x1))
        panels = [("image", []), ("original", [(case.original[z], "lime")]), ("new", [(case.new[z], "orange")]),
                  ("original + new", [(case.original[z], "lime"), (case.new[z], "orange")])]
        for c, (label, overlays) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img[crop], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            for mask, color in overlays:
                if mask[crop].any():
                    ax.contour(mask[crop].astype(float), levels=[0.5], colors=[color], linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}" + (f" (slice {z})" if c == 0 else ""), fontsize=9)
        axes[r][0].set_ylabel(case.title, fontsize=8)
    fig.suptitle("rtprop drift: worst ROIs (green original, orange re-propagated)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
