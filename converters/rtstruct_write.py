"""Masks on a series' grid -> a new RTSTRUCT that a TPS accepts.

Written with pydicom (not rt-utils): contours are the 0.5 iso-lines of each slice's mask
(`converters.contours`), holes are separate contours on the same slice (even-odd semantics),
coordinates go through `Geometry.index_to_patient` (so oblique and feet-first series come out
right), every DS value fits 16 characters and ROI names fit 16 characters (Eclipse).

The dataset is assembled in `build_rtstruct`, which validates the finished object and raises
`RTStructError` rather than return something a TPS would reject; `write_rtstruct` writes it to a
temporary file in the destination folder and renames it into place.
"""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import logging
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from pydicom.valuerep import MAX_VALUE_LEN

from config.schema import RTStructConfig
from converters.contours import mask_to_polygons
from converters.errors import RTStructError
from converters.files import atomic_path
from converters.geometry import Volume
from converters.tps import MAX_ROI_NAME, max_name_len, roi_name_for_tps, unique_names

log = logging.getLogger(__name__)

# RTReferencedStudySequence > ReferencedSOPClassUID: what Eclipse, RayStation and MIM write.
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
MAX_DS = 16  # DICOM DS value length
MANUFACTURER = "rtprop"
RT_ROI_INTERPRETED_TYPES = frozenset({"EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "OAR",
                                      "BOLUS", "AVOIDANCE", "ORGAN", "MARKER", "REGISTRATION", "ISOCENTER",
                                      "CONTRAST_AGENT", "CAVITY", "BRACHY_CHANNEL", "BRACHY_ACCESSORY",
                                      "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT", "FIXATION",
                                      "DOSE_REGION", "CONTROL", "DOSE_MEASUREMENT", ""})
ROI_GENERATION_ALGORITHMS = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")  # DICOM defined terms (C.8.8.5)

def software_version() -> str:
    """rtprop's version as installed (package metadata), written to SoftwareVersions."""
    try:
        return metadata.version("rtprop")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


# Attributes copied from the images' header, by module.
PATIENT_ATTRS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                 "OtherPatientIDsSequence", "PatientIdentityRemoved", "DeidentificationMethod")
STUDY_ATTRS = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
               "AccessionNumber", "StudyDescription", "PatientAge", "PatientSize", "PatientWeight")
TYPE2_EMPTY_OK = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass
class RoiMask:
    """One structure to write: `mask` is boolean (z, y, x) on the volume's grid.

    `color` (R, G, B 0-255) and `interpreted_type` (RTROIInterpretedType, e.g. ORGAN, GTV) default
    to the settings' roi_color / roi_interpreted_type. `generation_algorithm` is ROIGenerationAlgorithm
    (AUTOMATIC; SEMIAUTOMATIC once a person corrected it), `generation_description` says how (LO, 64).
    """

    name: str
    mask: np.ndarray
    color: tuple[int, int, int] | None = None
    interpreted_type: str | None = None
    description: str = ""
    generation_algorithm: str = "AUTOMATIC"
    generation_description: str = "rtprop propagation"


def format_ds(value: float) -> str:
    """A DS string of at most 16 characters (0.1 micrometre resolution for patient coordinates)."""
    value = float(value)
    if not np.isfinite(value):
        raise RTStructError(f"contour coordinate {value} is not finite")
    for decimals in (4, 3, 2, 1, 0):
        text = f"{value:.{decimals}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        if text in ("-0", ""):
            text = "0"
        if len(text) <= MAX_DS:
            return text
    text = f"{value:.9g}"
    if len(text) > MAX_DS:
        raise RTStructError(f"value {value} cannot be written as a 16-character DS")
    return text


def _derived_uid(volume: Volume, what: str) -> str:
    """A stable UID for an identity the images lack (anonymised data), derived from what they have."""
    sources = [volume.frame_of_reference_uid, *volume.sop_instance_uids[:1], what]
    uid = generate_uid(entropy_srcs=[s for s in sources if s])
    log.warning("images of frame of reference %s have no %s: using derived UID %s",
                volume.frame_of_reference_uid, what, uid)
    return uid


def _too_long(element) -> list[int]:
    """Lengths of the values of `element` that exceed its VR's maximum (DS, SH, LO, CS, ...)."""
    limit = MAX_VALUE_LEN.get(element.VR, 64 if element.VR == "PN" else None)
    if limit is None or element.value in (None, "") or isinstance(element.value, bytes):
        return []
    values = element.value if isinstance(element.value, (list, pydicom.multival.MultiValue)) else [element.value]
    return [len(str(v)) for v in values if len(str(v)) > limit]


def _copy(src: Dataset | None, dst: Dataset, keywords: Sequence[str]) -> None:
    """Copy attributes from the images; values longer than their VR allows (seen in real exports,
    e.g. a 17-character StudyID) are cut to the limit, because dciodvfy and TPSs reject them."""
    if src is None:
        return
    for keyword in keywords:
        if keyword not in src:
            continue
        with warnings.catch_warnings():  # pydicom warns on over-long values: handled (and logged) below
            warnings.simplefilter("ignore", UserWarning)
            element = copy.deepcopy(src[keyword])
            too_long = _too_long(element)
        if too_long:
            limit = MAX_VALUE_LEN.get(element.VR, 64)
            values = element.value if isinstance(element.value, (list, pydicom.multival.MultiValue)) else [element.value]
            cut = [str(v)[:limit].rstrip() for v in values]
            # the images' own defect (a 17-character Study ID is common), repaired here: worth a line at INFO, not
            # a warning about the result, which is valid (and the first thing the demo printed)
            log.info("%s of the images is longer than VR %s allows (%s > %d characters): cut to %d in the RTSTRUCT",
                     keyword, element.VR, max(len(str(v)) for v in values), limit, limit)
            element.value = cut if len(cut) > 1 else cut[0]
        dst[keyword] = element


CONTOUR_DATA = Tag("ContourData")
_TRAILING_ZEROS = re.compile(r"\.?0+(?=\\|$)")  # "12.5000" -> "12.5", "3.0000" -> "3" (every value has a '.')
_MINUS_ZERO = re.compile(r"(^|\\)-0(?=\\|$)")
FAST_DS_LIMIT = 1e9  # below this, "%.4f" never exceeds 16 characters: the first choice of `format_ds` fits


def ds_text(values: np.ndarray) -> str:
    """The multi-valued DS text of `values`: exactly "\\".join(format_ds(v) for v in values), formatted in
    bulk (a revision holds ~70,000 coordinates; one Python call each cost most of a write)."""
    values = np.asarray(values, dtype=float).ravel()
    if not values.size or not np.all(np.isfinite(values)) or np.max(np.abs(values)) >= FAST_DS_LIMIT:
        return "\\".join(format_ds(v) for v in values)  # names the non-finite value; longer formats
    text = "\\".join(["%.4f"] * values.size) % tuple(values.tolist())
    return _MINUS_ZERO.sub(r"\g<1>0", _TRAILING_ZEROS.sub("", text))


def ds_element(tag: BaseTag, text: str) -> RawDataElement:
    """A DS element holding `text` as it is written (explicit VR little endian), not parsed into one pydicom
    value object per number: written byte for byte as pydicom writes the same values, read lazily."""
    data = text.encode("ascii")
    if len(data) % 2:
        data += b" "  # DS values are padded to even length with a space
    return RawDataElement(tag, "DS", len(data), data, 0, False, True)


class SliceMemo:
    """A bounded, thread-safe memo of a pure per-slice function's results (least recently used dropped first).

    A correction changes one ROI on a few slices; every revision's RTSTRUCT holds every ROI: the unchanged
    slices' contours are looked up here by their inputs' digest instead of being traced or rasterised again.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def digest(*arrays: np.ndarray) -> bytes:
    """A digest of arrays' shapes and contents (bool arrays bit-packed first)."""
    h = hashlib.blake2b(digest_size=20)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(np.packbits(a).tobytes() if a.dtype == bool else a.tobytes())
    return h.digest()


TRACED = SliceMemo(maxsize=1024)  # (geometry, slice, mask digest) -> that slice's ContourData texts (<= ~30 MB)


def _slice_contours(geometry, mask2d: np.ndarray, k: int) -> list[tuple[int, str]]:
    """(number of points, ContourData text) of each outline of one slice's mask, in tracing order."""
    def trace() -> list[tuple[int, str]]:
        out = []
        for xy in mask_to_polygons(mask2d):
            ijk = np.column_stack([xy[:, 0], xy[:, 1], np.full(len(xy), float(k))])
            out.append((len(xy), ds_text(geometry.index_to_patient(ijk))))
        return out

    return TRACED.get((geometry, int(k), digest(mask2d)), trace)


def _contour_items(volume: Volume, mask: np.ndarray, sop_class: str) -> list[Dataset]:
    items = []
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        for n_points, text in _slice_contours(volume.geometry, mask[k], k):
            item = Dataset()
            image = Dataset()
            image.ReferencedSOPClassUID = sop_class
            image.ReferencedSOPInstanceUID = volume.sop_instance_uids[k]
            item.ContourImageSequence = DicomSequence([image])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = n_points
            item[CONTOUR_DATA] = ds_element(CONTOUR_DATA, text)
            items.append(item)
    for number, item in enumerate(items, start=1):
        item.ContourNumber = number
    return items


def _as_written(ds: Dataset) -> None:
    """Mark the contour items as encoded in the file's transfer syntax and character set, so that pydicom
    writes their raw ContourData as it is instead of parsing it to re-encode it."""
    for rc in ds.get("ROIContourSequence", []):
        for item in rc.get("ContourSequence", []):
            item.set_original_encoding(False, True, item._character_set)


def contour_values(contour: Dataset) -> list[str]:
    """A contour item's ContourData as the DS strings in the data set (a raw element is split, not parsed)."""
    element = contour.get_item(CONTOUR_DATA)
    if element is None:
        return []
    if element.is_raw:
        data = element.value or b""
        text = data.decode("latin-1").rstrip(" \0")  # the padding to even length
        return text.split("\\") if text else []
    raw = element.value
    return [str(v) for v in (raw if isinstance(raw, (list, pydicom.multival.MultiValue)) else [raw])]


def build_rtstruct(volume: Volume, rois: Sequence[RoiMask], settings: RTStructConfig | None = None,
                   *, series_description: str = "rtprop propagated contours",
                   now: dt.datetime | None = None, uid_seed: str | None = None,
                   structure_set_description: str = "") -> Dataset:
    """A complete, validated RT Structure Set dataset for `rois` drawn on `volume` (a DICOM series).

    New SOP Instance and Series UIDs: random, or derived from `uid_seed` (the same seed always gives
    the same UIDs: a job that runs twice writes the same instance, which a TPS stores once); patient and study modules and the Frame of Reference from the
    images; every slice listed in the ContourImageSequence of the referenced series; one
    CLOSED_PLANAR contour per outline (holes as further contours on the same slice), each pointing
    at the image it lies on. Raises `RTStructError` naming the ROI or attribute at fault.
    """
    settings = settings or RTStructConfig()
    now = now or dt.datetime.now()
    nz = volume.array.shape[0]
    if not volume.sop_instance_uids or len(volume.sop_instance_uids) != nz or not all(volume.sop_instance_uids):
        raise RTStructError(f"volume of series {volume.series_instance_uid or '?'} has "
                            f"{len(volume.sop_instance_uids)} SOP Instance UIDs for {nz} slices: "
                            "an RTSTRUCT can only be written on a DICOM series")
    if not volume.frame_of_reference_uid:
        raise RTStructError(f"series {volume.series_instance_uid or '?'} has no FrameOfReferenceUID: "
                            "contours cannot be tied to the images")
    if not rois:
        raise RTStructError("no ROIs to write")
    masks = []
    for roi in rois:
        mask = np.asarray(roi.mask)
        if mask.shape != volume.array.shape:
            raise RTStructError(f"ROI {roi.name!r}: mask shape {mask.shape} differs from the series "
                                f"{volume.series_instance_uid} grid {volume.array.shape}")
        masks.append(mask.astype(bool, copy=False))
        itype = (roi.interpreted_type if roi.interpreted_type is not None else settings.roi_interpreted_type).upper()
        if itype not in RT_ROI_INTERPRETED_TYPES:
            raise RTStructError(f"ROI {roi.name!r}: RTROIInterpretedType {itype!r} is not a DICOM defined term")
        if roi.generation_algorithm not in ROI_GENERATION_ALGORITHMS:
            raise RTStructError(f"ROI {roi.name!r}: ROIGenerationAlgorithm {roi.generation_algorithm!r} is not one of "
                                f"{', '.join(ROI_GENERATION_ALGORITHMS)}")
    header = volume.header
    sop_class = volume.sop_class_uid or (header.get("SOPClassUID", "") if header is not None else "")
    if not sop_class:
        raise RTStructError(f"series {volume.series_instance_uid}: images have no SOP Class UID")
    study_uid = volume.study_instance_uid or _derived_uid(volume, "StudyInstanceUID")
    series_uid = volume.series_instance_uid or _derived_uid(volume, "SeriesInstanceUID")

    ds = Dataset()
    ds.SpecificCharacterSet = (header.get("SpecificCharacterSet", "ISO_IR 100") if header is not None
                               else "ISO_IR 100") or "ISO_IR 100"
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "sop"]) if uid_seed else generate_uid()
    # Patient and General Study modules: the images' own values (Type 2 present even when empty).
    for keyword in TYPE2_EMPTY_OK:
        setattr(ds, keyword, "")
    _copy(header, ds, PATIENT_ATTRS + STUDY_ATTRS)
    ds.StudyInstanceUID = study_uid
    # RT Series module
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"]) if uid_seed else generate_uid()
    ds.SeriesNumber = 9901
    ds.SeriesDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.InstanceCreationTime
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    # General Equipment module
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "rtprop"
    ds.SoftwareVersions = software_version()
    # Frame of Reference (the images')
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.PositionReferenceIndicator = (header.get("PositionReferenceIndicator", "") if header is not None else "") or ""
    # Structure Set module
    ds.StructureSetLabel = (settings.structure_set_label or "RTPROP")[:16]
    ds.StructureSetName = ds.StructureSetLabel
    ds.StructureSetDate = ds.InstanceCreationDate
    ds.StructureSetTime = ds.InstanceCreationTime
    if structure_set_description:
        ds.StructureSetDescription = structure_set_description[:1024]  # ST
    ds.InstanceNumber = 1

    contour_images = []
    for uid in volume.sop_instance_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        contour_images.append(item)
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series_uid
    ref_series.ContourImageSequence = DicomSequence(contour_images)
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = STUDY_COMPONENT_SOP_CLASS
    ref_study.ReferencedSOPInstanceUID = study_uid
    ref_study.RTReferencedSeriesSequence = DicomSequence([ref_series])
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = volume.frame_of_reference_uid
    ref_for.RTReferencedStudySequence = DicomSequence([ref_study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref_for])

    longest = max_name_len(settings)  # the TPS profile's limit (Eclipse: 16)
    names = unique_names([roi_name_for_tps(r.name, settings.roi_suffix, longest) for r in rois], settings.roi_suffix,
                         longest)
    ss_rois, roi_contours, observations = [], [], []
    for number, (roi, mask, name) in enumerate(zip(rois, masks, names), start=1):
        if name != roi.name:
            log.info("ROI %r written as %r (suffix %r, %d-character limit)", roi.name, name,
                     settings.roi_suffix, longest)
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
        item.ROIName = name
        item.ROIDescription = (roi.description or roi.name)[:64]
        item.ROIGenerationAlgorithm = roi.generation_algorithm
        item.ROIGenerationDescription = roi.generation_description[:64]
        ss_rois.append(item)

        color = roi.color if roi.color is not None else settings.roi_color
        if len(color) != 3 or not all(0 <= int(c) <= 255 for c in color):
            raise RTStructError(f"ROI {roi.name!r}: colour {color} is not three values 0-255")
        rc = Dataset()
        rc.ROIDisplayColor = [int(c) for c in color]
        contours = _contour_items(volume, mask, sop_class)
        if contours:
            rc.ContourSequence = DicomSequence(contours)
        else:
            log.warning("ROI %r (number %d) is empty: written without contours", name, number)
        rc.ReferencedROINumber = number
        roi_contours.append(rc)

        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = (roi.interpreted_type if roi.interpreted_type is not None
                                    else settings.roi_interpreted_type).upper()
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(ss_rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    # Approval module: automatic contours are never approved by us.
    ds.ApprovalStatus = "UNAPPROVED"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    _as_written(ds)
    validate_rtstruct(ds, volume, longest)
    return ds


def validate_rtstruct(ds: Dataset, volume: Volume, max_name: int = MAX_ROI_NAME) -> None:
    """Refuse an RTSTRUCT a TPS would reject or misplace; `RTStructError` naming the attribute at fault.
    `max_name`: the longest ROI name the TPS takes (its profile's `max_name_len`)."""
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                    "StructureSetLabel", "FrameOfReferenceUID"):
        if not str(ds.get(keyword, "") or ""):
            raise RTStructError(f"RTSTRUCT {ds.get('SOPInstanceUID', '?')}: Type 1 attribute {keyword} is empty")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "OperatorsName",
                    "Manufacturer", "StructureSetDate", "StructureSetTime"):
        if keyword not in ds:
            raise RTStructError(f"RTSTRUCT {ds.SOPInstanceUID}: Type 2 attribute {keyword} is missing")
    for element in ds:
        if _too_long(element):
            raise RTStructError(f"RTSTRUCT {ds.SOPInstanceUID}: {element.keyword or element.tag} has a value longer "
                                f"than VR {element.VR} allows ({_too_long(element)[0]} characters)")
    slice_uids = set(volume.sop_instance_uids)
    slice_index = {uid: k for k, uid in enumerate(volume.sop_instance_uids)}
    listed = {item.ReferencedSOPInstanceUID
              for f in ds.ReferencedFrameOfReferenceSequence for st in f.RTReferencedStudySequence
              for se in st.RTReferencedSeriesSequence for item in se.ContourImageSequence}
    if listed != slice_uids:
        raise RTStructError(f"RTSTRUCT {ds.SOPInstanceUID}: ContourImageSequence does not list exactly the "
                            f"{len(slice_uids)} slices of series {volume.series_instance_uid}")
    numbers = [int(r.ROINumber) for r in ds.StructureSetROISequence]
    names = [str(r.ROIName) for r in ds.StructureSetROISequence]
    if len(set(numbers)) != len(numbers) or len({n.lower() for n in names}) != len(names):
        raise RTStructError(f"RTSTRUCT {ds.SOPInstanceUID}: ROI numbers or names not unique ({names})")
    for name in names:
        if not name or len(name) > max_name:
            raise RTStructError(f"ROI name {name!r} is empty or longer than {max_name} characters")
    normal = volume.geometry.direction_matrix[:, 2]
    origin = np.asarray(volume.geometry.origin_mm)
    dz = volume.geometry.spacing_mm[2]
    for rc in ds.ROIContourSequence:
        if int(rc.ReferencedROINumber) not in numbers:
            raise RTStructError(f"ROIContourSequence refers to ROI number {rc.ReferencedROINumber}, not defined")
        for c_no, contour in enumerate(rc.get("ContourSequence", []), start=1):
            n = int(contour.NumberOfContourPoints)
            values = contour_values(contour)
            if n < 3 or len(values) != 3 * n:
                raise RTStructError(f"ROI {rc.ReferencedROINumber} contour {c_no}: {n} points, "
                                    f"{len(values)} values (CLOSED_PLANAR needs >= 3 points, 3 values each)")
            long = [v for v in values if len(v) > MAX_DS]
            if long:
                raise RTStructError(f"ROI {rc.ReferencedROINumber} contour {c_no}: DS value {long[0]!r} is "
                                    f"longer than {MAX_DS} characters")
            refs = contour.ContourImageSequence
            if len(refs) != 1 or refs[0].ReferencedSOPInstanceUID not in slice_uids:
                raise RTStructError(f"ROI {rc.ReferencedROINumber} contour {c_no}: must reference exactly one "
                                    "image of the series")
            k = slice_index[refs[0].ReferencedSOPInstanceUID]
            pts = np.asarray(values, dtype=float).reshape(-1, 3)
            along = (pts - origin) @ normal / dz
            if np.max(np.abs(along - k)) > 1e-3:
                raise RTStructError(f"ROI {rc.ReferencedROINumber} contour {c_no}: points are not on slice {k} "
                                    f"({refs[0].ReferencedSOPInstanceUID}) it references")


def write_rtstruct(volume: Volume, rois: Sequence[RoiMask], path: str | Path,
                   settings: RTStructConfig | None = None, **kwargs) -> Path:
    """Build (see `build_rtstruct`) and write an RTSTRUCT to `path` atomically; return the path.

    A folder as `path` gets a file named RS_<SOPInstanceUID>.dcm. Nothing is left at `path` if
    building or writing fails.
    """
    ds = build_rtstruct(volume, rois, settings, **kwargs)
    path = Path(path)
    if path.is_dir():
        path = path / f"RS_{ds.SOPInstanceUID}.dcm"
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    log.info("wrote RTSTRUCT %s (%d ROIs) for series %s to %s", ds.SOPInstanceUID, len(rois),
             volume.series_instance_uid, path)
    return path
