"""File check of a written RTSTRUCT before it may leave the node: is the file what was computed?

The file on disk is read back with the same reader as any incoming RTSTRUCT, every ROI is
rasterised again and compared with the mask it was written from (Dice >= the threshold), and its
references are checked against the series it claims to be drawn on: the Frame of Reference, the
study, the referenced series, and that every ContourImageSequence UID is a slice of that series.
A failure holds the job (quarantine, with the reason) instead of sending something the TPS would
reject or misplace. Its Dice says the file carries the masks faithfully, nothing about whether the
masks are right: that is the result's confidence and the guard (models/confidence.py, models/guard.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from converters.geometry import Volume
from pipeline.metrics import dice


@dataclass
class FileCheck:
    ok: bool
    dice: dict[str, float] = field(default_factory=dict)  # written ROI name -> Dice against its mask
    problems: list[str] = field(default_factory=list)

    @property
    def min_dice(self) -> float | None:
        return min(self.dice.values()) if self.dice else None


def check_references(ds: pydicom.Dataset, volume: Volume) -> list[str]:
    """Problems with how the RTSTRUCT `ds` points at `volume` (empty list = fine)."""
    problems: list[str] = []
    slices = set(volume.sop_instance_uids)
    for_uid = volume.frame_of_reference_uid
    if str(ds.get("FrameOfReferenceUID", "")) != for_uid:
        problems.append(f"FrameOfReferenceUID {ds.get('FrameOfReferenceUID', '')} != series' {for_uid}")
    if volume.study_instance_uid and str(ds.get("StudyInstanceUID", "")) != volume.study_instance_uid:
        problems.append(f"StudyInstanceUID {ds.get('StudyInstanceUID', '')} != series' {volume.study_instance_uid}")
    frames = list(ds.get("ReferencedFrameOfReferenceSequence", []))
    if not frames:
        problems.append("ReferencedFrameOfReferenceSequence missing")
    for f in frames:
        if str(f.get("FrameOfReferenceUID", "")) != for_uid:
            problems.append(f"ReferencedFrameOfReferenceSequence names {f.get('FrameOfReferenceUID', '')}, not {for_uid}")
        studies = list(f.get("RTReferencedStudySequence", []))
        if not studies:
            problems.append("RTReferencedStudySequence missing")
        for st in studies:
            for se in st.get("RTReferencedSeriesSequence", []):
                if str(se.get("SeriesInstanceUID", "")) != volume.series_instance_uid:
                    problems.append(f"RTReferencedSeriesSequence names series {se.get('SeriesInstanceUID', '')}, "
                                    f"not {volume.series_instance_uid}")
                listed = [str(i.get("ReferencedSOPInstanceUID", "")) for i in se.get("ContourImageSequence", [])]
                foreign = [u for u in listed if u not in slices]
                if foreign:
                    problems.append(f"{len(foreign)} ContourImageSequence UID(s) not slices of the series, e.g. {foreign[0]}")
    for item in ds.get("StructureSetROISequence", []):
        if str(item.get("ReferencedFrameOfReferenceUID", "")) != for_uid:
            problems.append(f"ROI {item.get('ROIName', '?')!r} in FrameOfReferenceUID "
                            f"{item.get('ReferencedFrameOfReferenceUID', '')}, not {for_uid}")
    for rc in ds.get("ROIContourSequence", []):
        for n, contour in enumerate(rc.get("ContourSequence", []), start=1):
            refs = [str(i.get("ReferencedSOPInstanceUID", "")) for i in contour.get("ContourImageSequence", [])]
            if not refs:
                problems.append(f"ROI {rc.get('ReferencedROINumber', '?')} contour {n}: no ContourImageSequence")
            elif any(u not in slices for u in refs):
                problems.append(f"ROI {rc.get('ReferencedROINumber', '?')} contour {n}: references {refs[0]}, "
                                "not a slice of the series")
    return problems


def _dice_where_drawn(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two (z, y, x) masks over the slices either is on (the same value; a whole 500-slice volume
    costs a tenth of a second per ROI, most of it empty slices); 1 without counting when they are equal."""
    on = np.flatnonzero(np.asarray(a, bool).any(axis=(1, 2)) | np.asarray(b, bool).any(axis=(1, 2)))
    if not on.size:
        return dice(a, b)
    z = slice(int(on[0]), int(on[-1]) + 1)
    return 1.0 if np.array_equal(a[z], b[z]) else dice(a[z], b[z])  # equal: what iso-line contours give back


def check_file(path: str | Path, volume: Volume, masks: list[np.ndarray], min_dice: float) -> FileCheck:
    """Re-read `path`, compare ROI number i+1 with `masks[i]`, check the references; never raises."""
    from converters.rtstruct_read import read_rtstruct

    result = FileCheck(ok=False)
    try:
        ds = pydicom.dcmread(path)
        result.problems += check_references(ds, volume)
        structure_set = read_rtstruct(path, volume, dataset=ds)  # the same read: the file is parsed once
    except Exception as exc:  # noqa: BLE001 - a file we cannot read back must not be sent
        result.problems.append(f"cannot read the written RTSTRUCT back: {type(exc).__name__}: {exc}")
        return result
    by_number = {roi.number: roi for roi in structure_set.rois}
    if len(structure_set.rois) != len(masks):
        result.problems.append(f"{len(structure_set.rois)} ROIs read back, {len(masks)} written")
    for i, mask in enumerate(masks):
        roi = by_number.get(i + 1)
        if roi is None:
            result.problems.append(f"ROI number {i + 1} missing")
            continue
        d = _dice_where_drawn(roi.mask, mask)
        result.dice[roi.name] = round(d, 5)
        if d < min_dice:
            result.problems.append(f"ROI {roi.name!r}: Dice {d:.4f} between the re-read contours and the mask "
                                   f"is below file_check_min_dice {min_dice}")
    if structure_set.unmatched:
        u = structure_set.unmatched[0]
        result.problems.append(f"{len(structure_set.unmatched)} contour(s) not placed on the series when read "
                               f"back, e.g. ROI {u.roi_name!r}: {u.reason}")
    result.ok = not result.problems
    return result
