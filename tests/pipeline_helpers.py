"""Helpers for the pipeline tests: prompt RTSTRUCTs as a TPS would send them, small synthetic cases.

`make_prompt_rtstruct` builds, with pydicom only, an RTSTRUCT holding what a planner draws on one
slice: a rectangle (CLOSED_PLANAR, 4 corners) and/or POINT ROIs named with +/- markers, in the
series' Frame of Reference, referencing its study, series and the slice's SOP Instance UID.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from converters.geometry import Volume

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STS_CT = SHARED / "sts-001" / "CT"
STS_MR = SHARED / "sts-001" / "MR_T1"


def _fmt(v: float) -> str:
    return f"{v:.4f}".rstrip("0").rstrip(".")


def make_prompt_rtstruct(volume: Volume, path: Path, *, boxes: Iterable[tuple[str, int, tuple[int, int, int, int]]] = (),
                         points: Iterable[tuple[str, int, Iterable[tuple[float, float]]]] = (),
                         outlines: Iterable[tuple[str, int, np.ndarray]] = (),
                         manufacturer: str = "TPS-SIM", label: str = "PROMPT", reference_images: bool = True,
                         list_only_contoured: bool = False) -> Path:
    """Write a prompt RTSTRUCT for `volume` at `path`.

    reference_images=False: the contours reference images of another (e.g. original, uncropped)
    series with the same Frame of Reference, as the sts-001 RTSTRUCTs do: only the FoR is shared.

    boxes: (ROI name, slice, (x0, y0, x1, y1) voxel indices) -> a rectangle through those pixel centres.
    points: (ROI name, slice, [(x, y), ...]) -> a POINT ROI.
    outlines: (ROI name, slice, (N, 2) x/y voxel coordinates) -> a CLOSED_PLANAR polygon.
    list_only_contoured: RTReferencedSeriesSequence lists only the slices the contours are on (as some TPSs
    export), instead of every image of the series.
    """
    header = volume.header
    geometry = volume.geometry
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "AccessionNumber"):
        setattr(ds, kw, header.get(kw, "") if header is not None else "")
    ds.StudyID = str(header.get("StudyID", "") or "")[:16]
    ds.StudyInstanceUID = volume.study_instance_uid
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 77
    ds.Manufacturer = manufacturer
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.StructureSetLabel = label
    now = dt.datetime.now()
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceNumber = 1
    ds.ApprovalStatus = "UNAPPROVED"

    image_uids = list(volume.sop_instance_uids) if reference_images else [generate_uid() for _ in volume.sop_instance_uids]
    images = []
    for uid in image_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = volume.sop_class_uid
        item.ReferencedSOPInstanceUID = uid
        images.append(item)
    series = Dataset()
    series.SeriesInstanceUID = volume.series_instance_uid if reference_images else generate_uid()
    series.ContourImageSequence = Sequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = volume.study_instance_uid
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = volume.frame_of_reference_uid
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    rois, contours, observations = [], [], []

    def add(name: str, z: int, xy: np.ndarray, gtype: str) -> None:
        number = len(rois) + 1
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
        item.ROIName = name
        item.ROIGenerationAlgorithm = "MANUAL"
        rois.append(item)
        ijk = np.column_stack([xy[:, 0], xy[:, 1], np.full(len(xy), float(z))])
        xyz = geometry.index_to_patient(ijk)
        c = Dataset()
        ref = Dataset()
        ref.ReferencedSOPClassUID = volume.sop_class_uid
        ref.ReferencedSOPInstanceUID = image_uids[z]
        c.ContourImageSequence = Sequence([ref])
        c.ContourGeometricType = gtype
        c.NumberOfContourPoints = len(xyz)
        c.ContourNumber = 1
        c.ContourData = [_fmt(v) for v in xyz.ravel()]
        rc = Dataset()
        rc.ROIDisplayColor = [255, 255, 0]
        rc.ReferencedROINumber = number
        rc.ContourSequence = Sequence([c])
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = "MARKER" if gtype == "POINT" else "GTV"
        obs.ROIInterpreter = ""
        observations.append(obs)

    for name, z, (x0, y0, x1, y1) in boxes:
        add(name, z, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float), "CLOSED_PLANAR")
    for name, z, pts in outlines:
        add(name, z, np.asarray(pts, float), "CLOSED_PLANAR")
    for name, z, pts in points:
        for p in pts:  # one contour per point, as TPSs write POINT ROIs
            add(name, z, np.array([p], float), "POINT")
    # POINT ROIs with several points: merge the contours of equal names into one ROI
    merged: dict[str, int] = {}
    keep_rois, keep_contours, keep_obs = [], [], []
    for item, rc, obs in zip(rois, contours, observations):
        if item.ROIName in merged:
            target = keep_contours[merged[item.ROIName]]
            target.ContourSequence.append(rc.ContourSequence[0])
            target.ContourSequence[-1].ContourNumber = len(target.ContourSequence)
            continue
        merged[item.ROIName] = len(keep_rois)
        keep_rois.append(item)
        keep_contours.append(rc)
        keep_obs.append(obs)
    if list_only_contoured:
        drawn = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for rc in keep_contours for c in rc.ContourSequence}
        series.ContourImageSequence = Sequence([i for i in images if i.ReferencedSOPInstanceUID in drawn])
    for n, (item, rc, obs) in enumerate(zip(keep_rois, keep_contours, keep_obs), start=1):
        item.ROINumber = rc.ReferencedROINumber = obs.ReferencedROINumber = obs.ObservationNumber = n
    ds.StructureSetROISequence = Sequence(keep_rois)
    ds.ROIContourSequence = Sequence(keep_contours)
    ds.RTROIObservationsSequence = Sequence(keep_obs)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def gtv_prompts(volume: Volume, gtv: np.ndarray) -> dict:
    """From a reference GTV mask: its middle slice, bounding box, an inside point and an outside point."""
    from scipy import ndimage

    from pipeline.prompts import middle_slice

    z = middle_slice(gtv)
    key = gtv[z]
    rows, cols = np.flatnonzero(key.any(axis=1)), np.flatnonzero(key.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
    depth = ndimage.distance_transform_edt(np.pad(key, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    outside = (max(box[0] - 8, 0), max(box[1] - 8, 0))
    return {"slice": z, "box": box, "inside": (float(x), float(y)), "outside": (float(outside[0]), float(outside[1]))}


def sts_prompt_case(kind: str, out: Path) -> dict:
    """A prompt RTSTRUCT for sts-001 CT or MR: rectangle "GTV" and POINT ROIs "GTVpt+" / "GTVpt-"."""
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series

    root = STS_CT if kind == "CT" else STS_MR
    volume = read_series(root / "image")
    reference = read_rtstruct(next((root / "rtstruct").iterdir()), volume)
    gtv = reference.rois[0].mask
    p = gtv_prompts(volume, gtv)
    path = make_prompt_rtstruct(volume, out / "RS_prompt.dcm", boxes=[("GTV", p["slice"], p["box"])],
                                points=[("GTVpt+", p["slice"], [p["inside"]]), ("GTVpt-", p["slice"], [p["outside"]])])
    return {"volume": volume, "gtv": gtv, "prompt_path": path, **p}


def synthetic_case(folder: Path, seed: int, *, size: int = 24, slices: int = 12, patient_id: str = "SYN",
                   list_only_contoured: bool = False) -> dict:
    """A small CT phantom (bright ellipsoid in soft tissue) and a box-prompt RTSTRUCT in `folder`."""
    from converters.series import read_series
    from phantoms import ball, write_series

    rng = np.random.default_rng(seed)
    shape = (slices, size, size)
    centre = (slices / 2, size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2))
    radius = (slices / 3, size / 4, size / 4)
    mask = ball(shape, centre, radius)
    image = np.where(mask, 80.0, -20.0) + rng.normal(0, 5, shape)
    write_series(folder, image, spacing=(1.0, 1.0, 2.0), origin=(-12.0, -12.0, 0.0), patient_id=f"{patient_id}{seed:03d}",
                 seed=seed)
    volume = read_series(folder)
    z = slices // 2
    rows, cols = np.flatnonzero(mask[z].any(axis=1)), np.flatnonzero(mask[z].any(axis=0))
    make_prompt_rtstruct(volume, folder / "RS_prompt.dcm",
                         boxes=[("Tumour", z, (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])))],
                         list_only_contoured=list_only_contoured)
    return {"mask": mask, "volume": volume}


def ingest_sts_archive(config, factory) -> None:
    """sts-001 CT + MR and their GTV RTSTRUCTs taken in as the node does, the series then completed.

    CT and MR share one Frame of Reference and neither RTSTRUCT names a series that is here: the
    structure sets arrive after both image series, so only the instances their contours reference
    (CT Image Storage vs MR Image Storage) can tell which series each was drawn on."""
    from dicom_node.completion import CompletionChecker
    from dicom_node.storage import Received, Store

    store = Store(config.storage, factory, fsync=False)
    paths = [p for series in (STS_CT, STS_MR) for p in sorted((series / "image").iterdir())]
    paths += [p for series in (STS_MR, STS_CT) for p in sorted((series / "rtstruct").iterdir())]
    for path in paths:
        assert store.ingest(path.read_bytes(), Received(calling_ae="ARCHIVE", source="import")).status == 0
    CompletionChecker(factory, config).check()
    factory.kw["bind"].dispose()


def copy_as_new_patient(sources: list[Path], out: Path, patient_id: str) -> list[Path]:
    """Every file of `sources` with PatientID/PatientName `patient_id` and every instance UID replaced
    (one new UID per old one, across all files: references stay consistent). Class UIDs are kept."""
    mapping: dict[str, str] = {}

    def new(uid: str) -> str:
        return mapping.setdefault(uid, generate_uid())

    def remap(ds: pydicom.Dataset) -> None:
        for element in ds.iterall():
            if element.VR != "UI" or element.keyword.endswith("ClassUID") or element.keyword == "TransferSyntaxUID":
                continue
            if element.VM > 1:
                element.value = [new(str(v)) for v in element.value]
            elif element.value:
                element.value = new(str(element.value))

    written = []
    for source in sources:
        target = out / source.parent.parent.name / source.parent.name / source.name  # e.g. CT/image/000000.dcm
        target.parent.mkdir(parents=True, exist_ok=True)
        ds = pydicom.dcmread(source)
        remap(ds)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName = patient_id, "COPY^SARCOMA"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def case_files(root: Path) -> list[Path]:
    return sorted((root / "image").iterdir()) + sorted((root / "rtstruct").iterdir())


def claimed_dropin_job(tmp_path: Path, overrides: dict, **case):  # type: ignore[no-untyped-def]
    """A real job, claimed: a `synthetic_case(**case)` taken in through the drop-in of a node at
    `tmp_path / "s"` (configured by `overrides`), discovered and claimed. Returns (config, factory, made,
    job, task); the caller disposes of the factory."""
    import shutil

    from config.load import load_config, resolve_storage
    from db.engine import open_database
    from pipeline import jobs as J
    from pipeline.dropin import DropIn
    from pipeline.runner import task_for
    from pipeline.worker import Worker

    config = resolve_storage(load_config(None, environ={}, overrides={
        "storage": {"root": str(tmp_path / "s"), "fsync": False}, "node": {"series_quiet_period_s": 0},
        "dropin": {"stable_s": 0}, **overrides}))
    factory = open_database(config.storage.database)
    made = synthetic_case(tmp_path / "case", **case)
    config.dropin.inbox.mkdir(parents=True)
    shutil.copytree(tmp_path / "case", config.dropin.inbox / "case")
    DropIn(factory, config).take_all()
    Worker(factory, config).housekeeping()
    job = J.claim_next(factory, "here:1:1#w0")
    return config, factory, made, job, task_for(factory, config, job)
