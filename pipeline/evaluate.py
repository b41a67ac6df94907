"""`rtprop evaluate`: metrics between two masks, or ROIs of RTSTRUCTs on a series."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import ConversionError
from converters.geometry import Geometry
from converters.volume_io import read_volume
from pipeline.convert import is_rtstruct
from pipeline.metrics import evaluate_masks


def _load(path: Path, series_dir: Path | None, roi: str | None) -> tuple[np.ndarray, Geometry]:
    if is_rtstruct(path):
        if series_dir is None or roi is None:
            raise ConversionError(f"{path} is an RTSTRUCT: give --series DIR and --roi NAME")
        from converters.rtstruct_read import read_rtstruct
        from converters.series import read_series

        volume = read_series(series_dir)
        return read_rtstruct(path, volume).roi(roi).mask, volume.geometry
    volume = read_volume(path)
    values = np.unique(volume.array)
    if values.size > 2 or (values.size == 2 and values.min() != 0):
        shown = ", ".join(f"{v:g}" for v in values[:4]) + (", ..." if values.size > 4 else "")
        raise ConversionError(f"{path} holds {values.size} different values ({shown}), not a binary mask (0 and "
                              "one label): an image or a label map cannot be scored")
    return volume.array > 0, volume.geometry


def evaluate_files(pred: Path, gt: Path, series_dir: Path | None = None, roi: str | None = None,
                   pred_roi: str | None = None) -> dict[str, Any]:
    """Metrics of PRED against GT; both must lie on the same grid."""
    pred_mask, pred_geo = _load(Path(pred), series_dir, pred_roi or roi)
    gt_mask, gt_geo = _load(Path(gt), series_dir, roi)
    if pred_mask.shape != gt_mask.shape:
        raise ConversionError(f"{pred} has shape {pred_mask.shape} but {gt} has {gt_mask.shape}: not the same grid")
    if not np.allclose(pred_geo.spacing_mm, gt_geo.spacing_mm, atol=1e-3) or \
            not np.allclose(pred_geo.origin_mm, gt_geo.origin_mm, atol=1e-2):
        raise ConversionError(f"{pred} and {gt} have different geometry (origin/spacing): resample first")
    return {"pred": str(pred), "gt": str(gt), **evaluate_masks(pred_mask, gt_mask, gt_geo.spacing_zyx)}
