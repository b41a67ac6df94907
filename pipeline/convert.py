"""`rtprop convert`: DICOM series, volumes, masks and RTSTRUCTs into one another."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from config.schema import Config
from converters.errors import ConversionError
from converters.volume_io import read_mask, read_volume, write_mask, write_volume

MASK_SUFFIXES = (".nii", ".nii.gz", ".mha", ".npz")


def is_rtstruct(path: Path) -> bool:
    """True for a DICOM file whose Modality is RTSTRUCT (read with force: Monaco writes no preamble)."""
    path = Path(path)
    if path.is_dir() or path.name.lower().endswith(MASK_SUFFIXES):
        return False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["Modality"])
    except Exception:  # noqa: BLE001 - not DICOM: the caller's reader names the problem
        return False
    return str(ds.get("Modality", "")) == "RTSTRUCT"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "roi"


def rtstruct_to_masks(rtstruct: Path, series_dir: Path, dest: Path) -> dict[str, Any]:
    """Every non-empty ROI as a mask: one file per ROI in a folder, or one label map + a names JSON."""
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series

    volume = read_series(series_dir)
    structure_set = read_rtstruct(rtstruct, volume)
    rois = [r for r in structure_set.rois if r.mask is not None and r.mask.any()]
    written: list[str] = []
    if not dest.name.lower().endswith(MASK_SUFFIXES):  # a folder: one file per ROI
        dest.mkdir(parents=True, exist_ok=True)
        for roi in rois:
            written.append(str(write_mask(dest / f"{_safe_name(roi.name)}.nii.gz", roi.mask, volume.geometry)))
        labels = {r.name: i + 1 for i, r in enumerate(rois)}
    else:
        label_map = np.zeros(volume.array.shape, dtype=np.uint16 if len(rois) > 255 else np.uint8)
        labels = {}
        for i, roi in enumerate(rois, start=1):
            label_map[roi.mask & (label_map == 0)] = i  # first ROI wins where they overlap
            labels[roi.name] = i
        written.append(str(write_mask(dest, label_map, volume.geometry)))
        names = dest.with_name(dest.name + ".labels.json")
        names.write_text(json.dumps(labels, indent=2))
        written.append(str(names))
    return {"kind": "rtstruct->masks", "rois": labels, "written": written,
            "unmatched_contours": len(structure_set.unmatched)}


def masks_to_rtstruct(mask_path: Path, series_dir: Path, dest: Path, roi_name: str | None,
                      config: Config) -> dict[str, Any]:
    """A mask or label map on the series' grid as an RTSTRUCT (one ROI per label value)."""
    from converters.rtstruct_write import RoiMask, write_rtstruct
    from converters.series import read_series

    volume = read_series(series_dir)
    labels = read_mask(mask_path, volume.geometry)  # through patient coordinates when its grid differs
    if labels.shape != volume.array.shape:
        raise ConversionError(f"{mask_path} has shape {labels.shape}, the series {volume.array.shape}: not its grid")
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        raise ConversionError(f"{mask_path} is empty: nothing to write")
    base = roi_name or _safe_name(Path(mask_path).name.split(".")[0])
    rois = [RoiMask(base if len(values) == 1 else f"{base}_{v}", labels == v) for v in values]
    out = write_rtstruct(volume, rois, dest, config.rtstruct.model_copy(update={"roi_suffix": ""}))  # names as given
    return {"kind": "masks->rtstruct", "rois": [r.name for r in rois], "written": [str(out)]}


def convert_any(source: Path, dest: Path, *, series_dir: Path | None = None, roi_name: str | None = None,
                normalise: bool = False, config: Config | None = None) -> dict[str, Any]:
    """Pick the conversion from what SOURCE is and what DEST asks for (see `rtprop convert --help`)."""
    config = config or Config()
    source, dest = Path(source), Path(dest)
    if is_rtstruct(source):
        if series_dir is None:
            raise ConversionError(f"{source} is an RTSTRUCT: give --series DIR (the images it belongs to)")
        return rtstruct_to_masks(source, series_dir, dest)
    if dest.suffix.lower() == ".dcm":
        if series_dir is None:
            raise ConversionError("writing an RTSTRUCT needs --series DIR (the images the mask lies on)")
        return masks_to_rtstruct(source, series_dir, dest, roi_name, config)
    if normalise and not dest.name.lower().endswith(".npz"):
        raise ConversionError(f"--normalise writes MedSAM2's 0-255 intensities into an NPZ only; {dest.name} would "
                              "hold the raw values: give a .npz destination, or leave out --normalise")
    volume = read_volume(source)
    p = config.propagation
    options = {}
    if normalise:
        from models.preprocess import normalise as normalise_intensity

        options["normalised"] = normalise_intensity(volume.array, volume.modality, p.ct_window_level,
                                                    p.ct_window_width, tuple(p.mr_percentiles))
    out = write_volume(dest, volume, **options)
    return {"kind": "volume", "shape_zyx": list(volume.array.shape), "spacing_zyx_mm": list(volume.geometry.spacing_zyx),
            "modality": volume.modality, "written": [str(out)]}
