"""RTSTRUCT -> one boolean (z, y, x) mask per ROI on a series' grid.

Contours are matched to slices by Frame of Reference and position along the slice normal, never
by the SOP Instance UIDs they reference (RTSTRUCTs often reference the original series of a
cropped, re-exported or re-numbered one). Polygons on one slice combine by the even-odd (XOR)
rule, so an inner contour is a hole. POINT contours come back as points. A contour that lies on no
slice of the series, is empty, or is not closed is not rasterised: it is listed in
`StructureSet.unmatched` with the reason and logged, never dropped silently.

Vendor quirks handled: files without preamble/file meta (Monaco: read with force), empty
ContourData (old RayStation), NumberOfContourPoints disagreeing with ContourData, ROIs without
contours (Eclipse, XiO), references to images that do not exist (rt-utils edge cases).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import RTStructureSetStorage

from converters.contours import polygons_to_mask
from converters.errors import RTStructError
from converters.geometry import Volume
from converters.rtstruct_write import SliceMemo, digest

log = logging.getLogger(__name__)

PLANE_TOL_MM = 0.5  # a contour is on a slice if within min(this, PLANE_TOL_FRACTION * slice spacing)
PLANE_TOL_FRACTION = 0.25


@dataclass
class RoiPoint:
    """A POINT contour: patient LPS mm, and continuous (column, row, slice) index on the series."""

    patient_mm: tuple[float, float, float]
    index_xyz: tuple[float, float, float] | None = None


@dataclass
class UnmatchedContour:
    """A contour that was not rasterised, and why."""

    roi_number: int
    roi_name: str
    contour_number: int  # 1-based position in the ROI's ContourSequence
    geometric_type: str
    reason: str
    mean_position_mm: tuple[float, float, float] | None = None
    slice_coordinate: float | None = None  # continuous slice index of the contour's plane


@dataclass
class Roi:
    """One ROI of the structure set."""

    number: int
    name: str
    color: tuple[int, int, int] | None
    interpreted_type: str
    frame_of_reference_uid: str
    generation_algorithm: str = ""
    mask: np.ndarray | None = None  # bool (z, y, x) on the series' grid; None without a volume
    points: list[RoiPoint] = field(default_factory=list)
    contours_mm: list[np.ndarray] = field(default_factory=list)  # (N, 3) patient mm, every contour with data
    geometric_types: list[str] = field(default_factory=list)  # one per entry of contours_mm

    @property
    def is_empty(self) -> bool:
        """No contour data at all (many TPSs export defined-but-undrawn structures)."""
        return not self.contours_mm


@dataclass
class StructureSet:
    path: Path
    sop_instance_uid: str
    label: str
    frame_of_reference_uids: list[str]
    referenced_series_uids: list[str]
    rois: list[Roi]
    unmatched: list[UnmatchedContour] = field(default_factory=list)

    def roi(self, name: str) -> Roi:
        """The ROI called `name` (case-insensitive); `RTStructError` listing the names otherwise."""
        for roi in self.rois:
            if roi.name.lower() == name.lower():
                return roi
        raise RTStructError(f"{self.path}: no ROI named {name!r} (ROIs: {', '.join(r.name for r in self.rois) or 'none'})")


def _read_dataset(path: Path) -> pydicom.Dataset:
    try:
        try:
            return pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            return pydicom.dcmread(path, force=True)  # no preamble / file meta (e.g. Monaco)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise RTStructError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc


def _color(value) -> tuple[int, int, int] | None:
    try:
        rgb = tuple(int(float(v)) for v in value)
        return rgb if len(rgb) == 3 else None
    except Exception:  # noqa: BLE001 - malformed colour is cosmetic
        return None


def read_rtstruct(path: str | Path, volume: Volume | None = None, *,
                  dataset: pydicom.Dataset | None = None) -> StructureSet:
    """Read every ROI of the RTSTRUCT at `path`; with `volume`, rasterise them on its grid.

    `dataset`: the file already read by the caller (`pydicom.dcmread(path)`), so that it is read once.
    Raises `RTStructError` if the file is not a readable RT Structure Set (naming the file) or if an
    ROI's Frame of Reference differs from the volume's (naming both UIDs).
    """
    path = Path(path)
    ds = dataset if dataset is not None else _read_dataset(path)
    try:
        return _parse(path, ds, volume)
    except RTStructError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged element values surface lazily, on access
        raise RTStructError(f"{path}: damaged RTSTRUCT ({type(exc).__name__}: {exc})") from exc


def _parse(path: Path, ds: pydicom.Dataset, volume: Volume | None) -> StructureSet:
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    modality = str(ds.get("Modality", "") or "")
    if modality != "RTSTRUCT" and sop_class != RTStructureSetStorage:
        raise RTStructError(f"{path} is not an RTSTRUCT (Modality {modality!r}, SOP Class {sop_class!r})")
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    if "StructureSetROISequence" not in ds or "ROIContourSequence" not in ds:
        missing = [k for k in ("StructureSetROISequence", "ROIContourSequence") if k not in ds]
        raise RTStructError(f"{path} (SOP Instance {sop_uid or '?'}): {' and '.join(missing)} missing: "
                            "the file is damaged or truncated")

    frames = [str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence", [])]
    series_uids = [str(se.get("SeriesInstanceUID", ""))
                   for f in ds.get("ReferencedFrameOfReferenceSequence", [])
                   for st in f.get("RTReferencedStudySequence", [])
                   for se in st.get("RTReferencedSeriesSequence", [])]
    default_for = next((f for f in frames if f), "")

    rois: dict[int, Roi] = {}
    for item in ds.StructureSetROISequence:
        number = int(item.ROINumber)
        rois[number] = Roi(number=number, name=str(item.get("ROIName", "") or f"ROI_{number}"), color=None,
                           interpreted_type="",
                           frame_of_reference_uid=str(item.get("ReferencedFrameOfReferenceUID", "") or default_for),
                           generation_algorithm=str(item.get("ROIGenerationAlgorithm", "") or ""))
    for obs in ds.get("RTROIObservationsSequence", []):
        number = int(obs.get("ReferencedROINumber", -1))
        if number in rois:
            rois[number].interpreted_type = str(obs.get("RTROIInterpretedType", "") or "")

    if volume is not None and volume.frame_of_reference_uid:
        for roi in rois.values():
            if roi.frame_of_reference_uid and roi.frame_of_reference_uid != volume.frame_of_reference_uid:
                raise RTStructError(f"{path}: ROI {roi.name!r} is in FrameOfReferenceUID "
                                    f"{roi.frame_of_reference_uid}, the series {volume.series_instance_uid} in "
                                    f"{volume.frame_of_reference_uid}: contours cannot be placed on these images")
    elif volume is not None:
        log.warning("%s: series has no FrameOfReferenceUID; contours placed by position only", path)

    structure_set = StructureSet(path=path, sop_instance_uid=sop_uid,
                                 label=str(ds.get("StructureSetLabel", "") or ""),
                                 frame_of_reference_uids=frames, referenced_series_uids=series_uids,
                                 rois=[], unmatched=[])
    slice_uid_index = {uid: k for k, uid in enumerate(volume.sop_instance_uids)} if volume is not None else {}
    for rc in ds.ROIContourSequence:
        number = int(rc.get("ReferencedROINumber", -1))
        roi = rois.get(number)
        if roi is None:
            log.warning("%s: ROIContourSequence item for ROI number %s not in StructureSetROISequence; kept as ROI_%s",
                        path, number, number)
            roi = rois[number] = Roi(number=number, name=f"ROI_{number}", color=None, interpreted_type="",
                                     frame_of_reference_uid=default_for)
        roi.color = _color(rc.get("ROIDisplayColor", []))
        _read_contours(path, rc, roi, volume, structure_set, slice_uid_index)

    structure_set.rois = [rois[n] for n in sorted(rois)]
    for roi in structure_set.rois:
        if volume is not None and roi.mask is None:
            roi.mask = np.zeros(volume.array.shape, dtype=bool)
    if structure_set.unmatched:
        log.warning("%s (RTSTRUCT %s): %d contour(s) not rasterised, e.g. ROI %r contour %d: %s", path, sop_uid,
                    len(structure_set.unmatched), structure_set.unmatched[0].roi_name,
                    structure_set.unmatched[0].contour_number, structure_set.unmatched[0].reason)
    log.info("read RTSTRUCT %s: %d ROIs (%d empty)", sop_uid, len(structure_set.rois),
             sum(r.is_empty for r in structure_set.rois))
    return structure_set


CONTOUR_DATA = pydicom.tag.Tag("ContourData")
# (slice shape, digest of the polygons in voxel indices) -> their bit-packed mask: a revision's file check reads
# back every ROI, most of whose slices are those of the revision before (a pure function: same input, same mask)
RASTERISED = SliceMemo(maxsize=1024)  # 32 kB each on 512 x 512


def _rasterised(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """`polygons_to_mask(polygons, shape)`, remembered by the polygons' digest."""
    packed = RASTERISED.get((tuple(shape), digest(*polygons)),
                            lambda: np.packbits(polygons_to_mask(polygons, shape)))
    return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).astype(bool)


def _contour_values(contour) -> list:
    """ContourData's values; from the file's bytes when not yet parsed (one float per coordinate, instead of one
    validated pydicom DS object each: ~70,000 in a corrected result)."""
    element = contour.get_item(CONTOUR_DATA)
    if element is None:
        return []
    if element.is_raw and element.VR in ("DS", None):
        data = element.value or b""
        text = data.decode("latin-1").rstrip(" \0")  # the padding to even length
        return text.split("\\") if text.strip() else []
    raw = contour.get("ContourData")
    return [] if raw is None else raw if isinstance(raw, (list, pydicom.multival.MultiValue)) else [raw]


def _contour_points(contour) -> np.ndarray:
    values = _contour_values(contour)
    try:  # the file's strings at once (numpy parses surrounding spaces as float() does)
        values = np.asarray(values, dtype=float) if values and isinstance(values[0], str) else None
    except ValueError:  # an empty or bad value among them: one by one, below, which names it
        values = None
    if values is None:
        values = [float(v) for v in _contour_values(contour) if v not in (None, "") and str(v).strip()]
    if not len(values):
        return np.zeros((0, 3))
    if len(values) % 3:
        raise ValueError(f"{len(values)} values, not a multiple of 3")
    return np.asarray(values, dtype=float).reshape(-1, 3)


def _read_contours(path: Path, rc, roi: Roi, volume: Volume | None, structure_set: StructureSet,
                   slice_uid_index: dict[str, int]) -> None:
    per_slice: dict[int, list[np.ndarray]] = defaultdict(list)

    def unmatched(c_no: int, gtype: str, reason: str, pts: np.ndarray | None = None, k: float | None = None):
        mean = tuple(float(v) for v in pts.mean(axis=0)) if pts is not None and len(pts) else None
        structure_set.unmatched.append(UnmatchedContour(roi.number, roi.name, c_no, gtype, reason, mean, k))

    geometry = volume.geometry if volume is not None else None
    if geometry is not None:
        dz = abs(geometry.spacing_mm[2])
        tol = min(PLANE_TOL_MM, PLANE_TOL_FRACTION * dz) / dz  # in slices
    for c_no, contour in enumerate(rc.get("ContourSequence", []), start=1):
        gtype = str(contour.get("ContourGeometricType", "") or "").upper()
        try:
            pts = _contour_points(contour)
        except (ValueError, TypeError) as exc:
            unmatched(c_no, gtype, f"unreadable ContourData ({exc})")
            continue
        if len(pts) == 0:
            unmatched(c_no, gtype, "empty ContourData")
            continue
        declared = contour.get("NumberOfContourPoints")
        if declared not in (None, "") and int(declared) != len(pts):
            log.warning("%s: ROI %r contour %d declares %s points but has %d", path, roi.name, c_no, declared, len(pts))
        roi.contours_mm.append(pts)
        roi.geometric_types.append(gtype)
        if gtype == "POINT":
            for p in pts:
                idx = tuple(float(v) for v in geometry.patient_to_index(p)) if geometry is not None else None
                roi.points.append(RoiPoint(tuple(float(v) for v in p), idx))
            continue
        if geometry is None:
            continue
        if gtype not in ("CLOSED_PLANAR", ""):
            unmatched(c_no, gtype, f"{gtype} contour is not an area: not rasterised", pts)
            continue
        ijk = geometry.patient_to_index(pts)
        ks = ijk[:, 2]
        k_mean = float(ks.mean())
        if float(np.ptp(ks)) > 2 * tol:
            unmatched(c_no, gtype, "contour not parallel to the series' slices "
                      f"(spans slice coordinates {ks.min():.2f}..{ks.max():.2f})", pts, k_mean)
            continue
        k = int(round(k_mean))
        if abs(k_mean - k) > tol or not 0 <= k < volume.array.shape[0]:
            unmatched(c_no, gtype, f"plane at slice coordinate {k_mean:.2f} matches no slice of series "
                      f"{volume.series_instance_uid} (0..{volume.array.shape[0] - 1})", pts, k_mean)
            continue
        refs = contour.get("ContourImageSequence", [])
        if refs:
            ref_uid = str(refs[0].get("ReferencedSOPInstanceUID", ""))
            if ref_uid in slice_uid_index and slice_uid_index[ref_uid] != k:
                log.warning("%s: ROI %r contour %d references slice %d (%s) but lies on slice %d: placed by position",
                            path, roi.name, c_no, slice_uid_index[ref_uid], ref_uid, k)
        per_slice[k].append(ijk[:, :2])
    if volume is not None:
        mask = roi.mask if roi.mask is not None else np.zeros(volume.array.shape, dtype=bool)
        for k, polygons in per_slice.items():
            mask[k] ^= _rasterised(polygons, mask.shape[1:])
        roi.mask = mask


@dataclass(frozen=True)
class ImageListing:
    """The images a structure set says it was drawn on, for one referenced series.

    `listed`: SOP Instance UIDs in RTReferencedSeriesSequence -> ContourImageSequence; `contoured`: those its
    contours name (ROIContourSequence -> ContourSequence -> ContourImageSequence)."""

    series_instance_uid: str
    listed: frozenset[str]
    contoured: frozenset[str]

    @property
    def whole_series(self) -> bool:
        """Does it list images without contours (a TPS export listing every image of the series)? A listing of
        only the contoured slices, or one whose contours name no image, says nothing about the series' size."""
        return bool(self.contoured) and not self.listed <= self.contoured


def image_listings(ds: pydicom.Dataset) -> dict[str, ImageListing]:
    """Per referenced Series Instance UID, what an RTSTRUCT data set (header read) lists; {} when it lists none."""
    contoured = frozenset(str(img.get("ReferencedSOPInstanceUID", "")) for rc in ds.get("ROIContourSequence", [])
                          for c in rc.get("ContourSequence", []) for img in c.get("ContourImageSequence", []))
    out: dict[str, ImageListing] = {}
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                uid = str(series.get("SeriesInstanceUID", "") or "")
                listed = frozenset(str(img.get("ReferencedSOPInstanceUID", ""))
                                   for img in series.get("ContourImageSequence", [])) - {""}
                if uid and listed:
                    out[uid] = ImageListing(uid, listed, contoured & listed)
    return out
