"""DICOM image series -> `Volume`: slices ordered along the slice normal, never by file name or number.

A folder must hold one clean single-frame series (CT or MR): one orientation, one in-plane grid,
evenly spaced positions along the normal, no gantry tilt. Anything else is refused with an error
that names the file, UID or positions at fault, because a silently wrong geometry ends up as a
wrongly placed contour in the treatment planning system.

Objects that are not images (RTSTRUCT, RTPLAN, RTDOSE, SEG, SR, ...) are skipped, so a folder may
hold a series and its structure set.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from converters.contiguity import POSITION_TOL_MM, Contiguity, check_contiguity
from converters.errors import SeriesError, SeriesIncompleteError
from converters.geometry import Geometry, Volume

log = logging.getLogger(__name__)

# Modalities that never hold image slices of a volume; skipped when reading a folder.
NON_IMAGE_MODALITIES = frozenset({"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SEG", "SR",
                                  "PR", "KO", "REG", "DOC", "PLAN", "RWV", "FID", "RTTREAT"})
# File names that are obviously not DICOM; anything else must read as DICOM or is reported corrupt.
SKIPPED_SUFFIXES = frozenset({".txt", ".md", ".json", ".xml", ".csv", ".nii", ".gz", ".mha", ".mhd",
                              ".npz", ".npy", ".png", ".jpg", ".jpeg", ".yaml", ".yml", ".log", ".zip"})
SKIPPED_NAMES = frozenset({"DICOMDIR", "LICENSE", "README"})

ORIENTATION_TOL = 1e-4  # max difference between direction cosines of two slices


@dataclass(frozen=True)
class SliceHeader:
    """What is needed of one file to group and order it, read without pixel data."""

    path: Path
    dataset: Dataset
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str

    @property
    def is_image(self) -> bool:
        return self.modality.upper() not in NON_IMAGE_MODALITIES and "Rows" in self.dataset


def _candidate_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise SeriesError(f"{folder} is not a folder")
    files = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() in SKIPPED_SUFFIXES or path.stem.upper() in SKIPPED_NAMES:
            continue
        files.append(path)
    return files


def read_header(path: Path) -> SliceHeader:
    """Read one file's header (no pixel data); `SeriesError` naming the file if it is not readable DICOM."""
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            # Files written without preamble/file meta (e.g. Elekta Monaco) are still DICOM.
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        meta = getattr(ds, "file_meta", Dataset())
        modality = str(ds.get("Modality", "") or "")
        sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", "") or "")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise SeriesError(f"{path}: unreadable or corrupt DICOM file ({type(exc).__name__}: {exc})") from exc
    if not modality and not sop_class:
        raise SeriesError(f"{path}: not a DICOM object (no Modality and no SOP Class UID)")
    return SliceHeader(path, ds, series_uid, sop_uid, sop_class, modality)


def _float_list(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except Exception as exc:  # noqa: BLE001
        raise SeriesError(f"{path}: {keyword} missing or not numeric ({value!r})") from exc
    if arr.shape != (n,):
        raise SeriesError(f"{path}: {keyword} has {arr.size} values, expected {n}")
    return arr


def _check_single_frame(header: SliceHeader) -> None:
    frames = header.dataset.get("NumberOfFrames")
    if frames is not None and int(frames or 1) > 1:
        raise SeriesError(f"{header.path}: multi-frame image ({int(frames)} frames, SOP Class "
                          f"{header.sop_class_uid}) is not supported; export the series as single-frame slices")


def read_series(folder: str | Path, series_instance_uid: str | None = None, *, pixels: bool = True) -> Volume:
    """Read one DICOM image series from `folder` into a `Volume` (CT in HU, MR as rescaled values).

    `series_instance_uid` picks one series when the folder holds several; without it a folder with
    more than one image series is refused (`SeriesError` naming them). Slices are ordered by their
    position along the slice normal (cross product of the ImageOrientationPatient row and column
    directions); the volume's direction columns are (row direction, column direction, normal) and
    slice index grows with position along the normal. `Volume.header` is the first slice's
    header without pixel data.

    `pixels=False` reads headers only (every check above still made): the volume's array then has the
    series' shape and holds no image (read-only zeros, no memory), for work that needs only the
    geometry and the slices' identities, such as finding a job's prompts (pipeline/discovery.py).

    Raises `SeriesError` (mixed orientations, gantry tilt, multi-frame, unreadable file, different
    grids) or `SeriesIncompleteError` (missing or unevenly spaced slices, duplicate positions).
    """
    folder = Path(folder)
    headers: dict[str, list[SliceHeader]] = defaultdict(list)
    for path in _candidate_files(folder):
        header = read_header(path)
        if header.is_image:
            headers[header.series_instance_uid].append(header)
    if not headers:
        raise SeriesError(f"{folder}: no DICOM image files found")
    if series_instance_uid is not None:
        if series_instance_uid not in headers:
            raise SeriesError(f"{folder}: no series {series_instance_uid} (series here: "
                              f"{', '.join(sorted(headers)) or 'none'})")
        slices = headers[series_instance_uid]
    elif len(headers) > 1:
        described = "; ".join(f"{uid or '<no SeriesInstanceUID>'} ({len(h)} files, {h[0].modality}, e.g. {h[0].path.name})"
                              for uid, h in sorted(headers.items()))
        raise SeriesError(f"{folder} holds {len(headers)} image series: {described}; "
                          "give one folder per series or pick one by SeriesInstanceUID (rtprop propagate "
                          "--series-uid UID)")
    else:
        slices = next(iter(headers.values()))
    return _assemble(folder, slices, pixels)


@dataclass
class _Stack:
    """The checked geometry of a series' slices, in order along the normal (no pixel data)."""

    slices: list[SliceHeader]
    positions: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    rows: int
    cols: int
    pixel_spacing: np.ndarray  # (row spacing, column spacing)
    slice_spacing: float


def check_series_files(paths: list[Path] | list[str]) -> Contiguity:
    """Would `read_series` take these files as one complete series? Headers only, no pixel data.

    The node's completion asks this (dicom_node/completion.py): the same checks, so a series it calls
    complete is never refused when its job reads it. `final` problems (tilt, mixed grids) cannot be
    fixed by more slices arriving.
    """
    slices = [h for h in (read_header(Path(p)) for p in paths) if h.is_image]
    if not slices:
        return Contiguity(True, "no image slices (non-image series)")
    try:
        stack = _stack(Path(slices[0].path).parent, slices)
    except SeriesIncompleteError as exc:
        return Contiguity(False, str(exc), slices=len(slices), missing_mm=exc.missing_mm)
    except SeriesError as exc:
        return Contiguity(False, str(exc), slices=len(slices), final=True)
    return Contiguity(True, f"{len(stack.slices)} slices, spacing {stack.slice_spacing:.3f} mm",
                      slices=len(stack.slices), spacing_mm=stack.slice_spacing)


def _assemble(folder: Path, slices: list[SliceHeader], pixels: bool = True) -> Volume:
    stack = _stack(folder, slices)
    slices, positions, rows, cols = stack.slices, stack.positions, stack.rows, stack.cols
    if pixels:
        array = np.empty((len(slices), rows, cols), dtype=np.float32)
        for k, header in enumerate(slices):
            array[k] = _read_pixels(header, rows, cols)
    else:  # the shape without the image: one zero seen through zero strides, read-only
        array = np.broadcast_to(np.float32(0), (len(slices), rows, cols))

    direction = np.column_stack([stack.row_dir, stack.col_dir, stack.normal])
    geometry = Geometry(origin_mm=tuple(float(v) for v in positions[0]),
                        spacing_mm=(float(stack.pixel_spacing[1]), float(stack.pixel_spacing[0]),
                                    float(stack.slice_spacing)),
                        direction=tuple(float(v) for v in direction.ravel()),
                        shape_zyx=(len(slices), rows, cols))
    ds0 = slices[0].dataset
    volume = Volume(array=array, geometry=geometry, modality=slices[0].modality,
                    series_instance_uid=slices[0].series_instance_uid,
                    study_instance_uid=str(ds0.get("StudyInstanceUID", "") or ""),
                    frame_of_reference_uid=str(ds0.get("FrameOfReferenceUID", "") or ""),
                    sop_class_uid=slices[0].sop_class_uid,
                    sop_instance_uids=[h.sop_instance_uid for h in slices],
                    files=[h.path for h in slices], header=ds0)
    for uid_name in ("series_instance_uid", "study_instance_uid", "frame_of_reference_uid"):
        if not getattr(volume, uid_name):
            log.warning("series in %s has no %s (anonymised?)", folder, uid_name)
    log.info("read series %s: %d slices %dx%d, spacing_zyx %s mm, modality %s", volume.series_instance_uid,
             len(slices), rows, cols, geometry.spacing_zyx, volume.modality)
    return volume


def _stack(folder: Path, slices: list[SliceHeader]) -> _Stack:
    """Check one series' headers (single frame, one orientation and grid, no tilt, contiguous); order them."""
    for header in slices:
        _check_single_frame(header)
    first = slices[0]
    iop0 = _float_list(first.dataset, "ImageOrientationPatient", 6, first.path)
    for header in slices[1:]:
        iop = _float_list(header.dataset, "ImageOrientationPatient", 6, header.path)
        if np.max(np.abs(iop - iop0)) > ORIENTATION_TOL:
            raise SeriesError(f"mixed orientations in series {first.series_instance_uid or folder}: "
                              f"{first.path.name} has ImageOrientationPatient {iop0.tolist()}, "
                              f"{header.path.name} has {iop.tolist()}")
    row_dir, col_dir = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 \
            or abs(row_dir @ col_dir) > 1e-3:
        raise SeriesError(f"{first.path}: ImageOrientationPatient {iop0.tolist()} is not two orthonormal directions")
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)

    rows, cols = int(first.dataset.Rows), int(first.dataset.Columns)
    pixel_spacing = _float_list(first.dataset, "PixelSpacing", 2, first.path)  # (row spacing, column spacing)
    for header in slices[1:]:
        ds = header.dataset
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise SeriesError(f"{header.path.name} is {int(ds.Rows)}x{int(ds.Columns)} pixels but "
                              f"{first.path.name} is {rows}x{cols} in series {first.series_instance_uid}")
        ps = _float_list(ds, "PixelSpacing", 2, header.path)
        if np.max(np.abs(ps - pixel_spacing)) > 1e-4:
            raise SeriesError(f"{header.path.name} has PixelSpacing {ps.tolist()} but {first.path.name} "
                              f"has {pixel_spacing.tolist()} in series {first.series_instance_uid}")

    positions = np.stack([_float_list(h.dataset, "ImagePositionPatient", 3, h.path) for h in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]
    slice_spacing = _check_positions(folder, slices, positions, along, normal, first.dataset)
    return _Stack(slices, positions, row_dir, col_dir, normal, rows, cols, pixel_spacing, slice_spacing)


def _check_positions(folder: Path, slices: list[SliceHeader], positions: np.ndarray, along: np.ndarray,
                     normal: np.ndarray, ds0: Dataset) -> float:
    """Refuse tilt, duplicates, gaps and uneven spacing; return the slice spacing in mm."""
    uid = slices[0].series_instance_uid or str(folder)
    # Gantry tilt / sheared stacks: successive positions must move along the normal only.
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    worst = int(np.argmax(drift))
    if drift[worst] > max(POSITION_TOL_MM, 1e-3 * abs(along[-1] - along[0])):
        raise SeriesError(f"series {uid}: ImagePositionPatient of {slices[worst].path.name} "
                          f"{positions[worst].tolist()} is {drift[worst]:.3f} mm off the slice normal through "
                          f"{slices[0].path.name} {positions[0].tolist()} (gantry tilt or sheared stack: not supported)")
    if len(slices) == 1:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = ds0.get(keyword)
            if value not in (None, "") and float(value) > 0:
                return float(value)
        return 1.0
    result = check_contiguity(along, thickness_mm=_number(ds0, "SliceThickness"),
                              instance_numbers=[_number(h.dataset, "InstanceNumber") for h in slices])
    if not result.ok:
        raise SeriesIncompleteError(f"series {uid}: {result.reason}", result.missing_mm)
    return float(np.mean(np.diff(along)))


def _number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _read_pixels(header: SliceHeader, rows: int, cols: int) -> np.ndarray:
    """Pixel data of one slice after Rescale Slope/Intercept (HU for CT)."""
    path = header.path
    try:
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            ds = pydicom.dcmread(path, force=True)
        if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
            # No file meta (written without it): assume the most common encoding; pydicom guessed it when parsing.
            ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
            ds.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if ds.is_implicit_VR
                                              else pydicom.uid.ExplicitVRLittleEndian)
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated data, unsupported codec, ...
        raise SeriesError(f"{path}: pixel data unreadable ({type(exc).__name__}: {exc})") from exc
    if pixels.shape != (rows, cols):
        raise SeriesError(f"{path}: pixel data has shape {pixels.shape}, expected ({rows}, {cols}) "
                          "(colour or multi-frame images are not supported)")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def slice_positions_mm(volume: Volume) -> np.ndarray:
    """Patient position (x, y, z mm) of each slice's first voxel, index order: ImagePositionPatient."""
    k = np.arange(volume.array.shape[0], dtype=float)
    ijk = np.stack([np.zeros_like(k), np.zeros_like(k), k], axis=1)
    return volume.geometry.index_to_patient(ijk)


def describe(volume: Volume) -> dict[str, Any]:
    """A short, patient-name-free summary of a volume for logs and CLI output."""
    return {"series_instance_uid": volume.series_instance_uid, "modality": volume.modality,
            "shape_zyx": list(volume.array.shape), "spacing_zyx_mm": list(volume.geometry.spacing_zyx),
            "frame_of_reference_uid": volume.frame_of_reference_uid}
