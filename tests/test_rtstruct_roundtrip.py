"""Masks -> RTSTRUCT -> masks: real CT with organ labels, oblique and feet-first phantoms, holes, placement."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from config.schema import RTStructConfig
from converters.contours import mask_to_polygons, polygons_to_mask
from converters.rtstruct_read import read_rtstruct
from converters.rtstruct_write import RoiMask, write_rtstruct
from converters.series import read_series
from converters.volume_io import resample_to
from phantoms import ball, l_shape, rotation_iop, voxel_to_patient, write_series

MIN_VOXELS = 50  # structures smaller than this are skipped: Dice on a handful of voxels is noise


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


@pytest.fixture(scope="module")
def totalseg(shared_data, tmp_path_factory):
    vol = read_series(shared_data / "totalseg-ct" / "dicom")
    labels = resample_to(sitk.ReadImage(str(shared_data / "totalseg-ct" / "dicom_labels.nii.gz")), vol.geometry)
    present = [int(v) for v in np.unique(labels) if v]
    rois = [RoiMask(f"label_{v}", labels == v) for v in present if (labels == v).sum() >= MIN_VOXELS]
    path = write_rtstruct(vol, rois, tmp_path_factory.mktemp("rs") / "RS.dcm", RTStructConfig())
    return vol, labels, rois, present, path


def test_totalseg_dice_per_structure(totalseg):
    vol, labels, rois, present, path = totalseg
    assert 80 < vol.array[labels == 5].mean() < 100  # liver: labels aligned through physical space
    assert len(rois) >= 20, f"only {len(rois)} of {len(present)} structures have >= {MIN_VOXELS} voxels"
    back = read_rtstruct(path, vol)
    assert not back.unmatched
    by_name = {r.name: r for r in back.rois}
    for roi in rois:
        got = by_name[roi.name + "_prop"].mask
        assert dice(got, roi.mask) >= 0.98, roi.name


def test_totalseg_contours_on_the_slice_they_reference(totalseg):
    vol, _, _, _, path = totalseg
    ds = pydicom.dcmread(path)
    z_of_image = {}
    for f in vol.files:
        h = pydicom.dcmread(f, stop_before_pixels=True)
        uid = h.SOPInstanceUID or h.file_meta.MediaStorageSOPInstanceUID
        z_of_image[uid] = float(h.ImagePositionPatient[2])  # axial series: normal = +z
    listed = [i.ReferencedSOPInstanceUID for i in
              ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
              .RTReferencedSeriesSequence[0].ContourImageSequence]
    assert sorted(listed) == sorted(z_of_image)
    n = 0
    for rc in ds.ROIContourSequence:
        for c in rc.ContourSequence:
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            assert len(c.ContourImageSequence) == 1
            zs = np.asarray(c.ContourData, float).reshape(-1, 3)[:, 2]
            assert np.allclose(zs, z_of_image[c.ContourImageSequence[0].ReferencedSOPInstanceUID], atol=1e-3)
            assert int(c.NumberOfContourPoints) >= 3
            assert all(len(str(v)) <= 16 for v in c["ContourData"].value)
            n += 1
    assert n > 100


def test_totalseg_identity_and_attributes(totalseg):
    vol, _, rois, _, path = totalseg
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID not in vol.sop_instance_uids and ds.SeriesInstanceUID != vol.series_instance_uid
    assert ds.FrameOfReferenceUID == vol.frame_of_reference_uid
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == vol.frame_of_reference_uid
    assert ds.StudyDate == vol.header.StudyDate
    assert all(r.ROIGenerationAlgorithm == "AUTOMATIC" for r in ds.StructureSetROISequence)
    assert all(r.ReferencedFrameOfReferenceUID == vol.frame_of_reference_uid for r in ds.StructureSetROISequence)
    assert all(len(r.ROIName) <= 16 for r in ds.StructureSetROISequence)
    assert [list(rc.ROIDisplayColor) for rc in ds.ROIContourSequence] == [[255, 128, 0]] * len(rois)
    assert {o.RTROIInterpretedType for o in ds.RTROIObservationsSequence} == {"ORGAN"}


def test_dciodvfy_and_dcmdump(totalseg):
    _, _, _, _, path = totalseg
    for tool in ("dciodvfy", "dcmdump"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian packages dicom3tools / dcmtk)")
    dump = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    assert "RTSTRUCT" in dump.stdout
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (check.stdout + check.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(lines)
    assert any("RTStructureSet" in line for line in lines)  # it recognised the IOD


def test_dciodvfy_on_phantom_with_full_patient_module(tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    write_series(tmp_path / "ct", np.zeros((4, 20, 20)))
    vol = read_series(tmp_path / "ct")
    mask = np.zeros(vol.array.shape, bool)
    mask[1:3, 5:12, 6:10] = True
    path = write_rtstruct(vol, [RoiMask("A very long structure name", mask)], tmp_path / "RS.dcm")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (out.stdout + out.stderr).splitlines()
    assert not [line for line in lines if line.startswith(("Error", "Warning"))], "\n".join(lines)
    ds = pydicom.dcmread(path)
    assert ds.PatientName == "PHANTOM^TEST" and ds.StudyInstanceUID == vol.study_instance_uid
    assert ds.StructureSetROISequence[0].ROIName == "A very long_prop"


@pytest.mark.parametrize("case", ["oblique", "feet_first", "negative_normal"])
def test_phantom_roundtrip(tmp_path, case):
    shape = (12, 48, 40)
    kwargs = {"oblique": dict(iop=rotation_iop(30, 25)),
              "feet_first": dict(slice_step_sign=-1),
              "negative_normal": dict(iop=(-1, 0, 0, 0, -1, 0))}[case]
    write_series(tmp_path / "img", np.zeros(shape), spacing=(0.8, 1.2, 2.5), origin=(-20, 35, 100), **kwargs)
    vol = read_series(tmp_path / "img")
    organ = ball(shape, (6, 22, 18), (4.5, 14, 10)) & ~ball(shape, (6, 20, 22), (2.5, 5, 4))
    small = ball(shape, (3, 38, 30), (1.2, 2.5, 3))
    path = write_rtstruct(vol, [RoiMask("organ", organ), RoiMask("small", small, color=(0, 255, 0),
                                                                    interpreted_type="GTV")], tmp_path / "RS.dcm")
    back = read_rtstruct(path, vol)
    assert [r.name for r in back.rois] == ["organ_prop", "small_prop"]
    assert back.rois[1].color == (0, 255, 0) and back.rois[1].interpreted_type == "GTV"
    assert dice(back.rois[0].mask, organ) >= 0.98
    assert dice(back.rois[1].mask, small) >= 0.98


@pytest.mark.parametrize("case", ["oblique", "feet_first"])
def test_known_patient_position_not_mirrored(tmp_path, case):
    """An asymmetric L drawn on known voxels: its RTSTRUCT points, mapped back to voxels with the
    phantom's own IPP/IOP formula (not Geometry), enclose exactly those voxels, on the right slices."""
    shape = (8, 24, 32)
    spacing, origin = (0.9, 1.3, 3.0), (-40.0, 25.0, -300.0)
    iop = rotation_iop(30, 20) if case == "oblique" else (1, 0, 0, 0, 1, 0)
    sign = -1 if case == "feet_first" else 1
    write_series(tmp_path / "img", np.zeros(shape), spacing=spacing, origin=origin, iop=iop, slice_step_sign=sign)
    vol = read_series(tmp_path / "img")
    written = l_shape(shape)  # in the order the phantom was written (file slice k)
    mask = written[::-1] if sign < 0 else written  # the same voxels in the reader's order
    path = write_rtstruct(vol, [RoiMask("L", mask)], tmp_path / "RS.dcm")
    # patient -> (k, r, c) of the written array, by inverting the phantom's formula
    basis = np.column_stack([voxel_to_patient(np.eye(3)[i], spacing, (0, 0, 0), iop, sign) for i in range(3)])
    ds = pydicom.dcmread(path)
    placed = np.zeros(shape, bool)
    for c in ds.ROIContourSequence[0].ContourSequence:
        pts = np.asarray(c.ContourData, float).reshape(-1, 3)
        krc = np.linalg.solve(basis, (pts - np.asarray(origin)).T).T
        k = int(round(krc[0, 0]))
        assert np.allclose(krc[:, 0], k, atol=1e-3)  # planar, on a slice of the phantom
        placed[k] ^= polygons_to_mask([krc[:, [2, 1]]], shape[1:])
    np.testing.assert_array_equal(placed, written)
    assert not np.array_equal(placed, written[:, :, ::-1]) and not np.array_equal(placed, written[:, ::-1, :])
    back = read_rtstruct(path, vol)
    np.testing.assert_array_equal(back.rois[0].mask, mask)


def test_hole_and_two_islands_on_one_slice(tmp_path):
    shape = (3, 40, 40)
    write_series(tmp_path / "img", np.zeros(shape), iop=rotation_iop(30))
    vol = read_series(tmp_path / "img")
    mask = np.zeros(shape, bool)
    mask[1, 5:25, 5:25] = True
    mask[1, 11:18, 11:18] = False  # hole
    mask[1, 30:36, 28:37] = True  # second island
    mask[1, 14, 14] = True  # an island inside the hole
    path = write_rtstruct(vol, [RoiMask("ring", mask)], tmp_path / "RS.dcm")
    ds = pydicom.dcmread(path)
    assert len(ds.ROIContourSequence[0].ContourSequence) == 4  # outer, hole, island, island-in-hole
    back = read_rtstruct(path, vol).rois[0].mask
    np.testing.assert_array_equal(back, mask)
    assert not back[1, 12, 12] and back[1, 14, 14]


def test_tiny_blob_gives_valid_polygon(tmp_path):
    write_series(tmp_path / "img", np.zeros((3, 10, 10)))
    vol = read_series(tmp_path / "img")
    mask = np.zeros((3, 10, 10), bool)
    mask[1, 4, 4] = True
    mask[2, 6, 6] = mask[2, 7, 7] = True  # diagonal pair: two polygons, no 2-point contour
    path = write_rtstruct(vol, [RoiMask("dot", mask)], tmp_path / "RS.dcm")
    ds = pydicom.dcmread(path)
    assert all(int(c.NumberOfContourPoints) >= 3 for c in ds.ROIContourSequence[0].ContourSequence)
    np.testing.assert_array_equal(read_rtstruct(path, vol).rois[0].mask, mask)


def test_centre_line_contours_rasterise_to_the_mask(shared_data):
    """Contours drawn through the centres of a mask's boundary voxels (TPS style) give that mask back."""
    vol = read_series(shared_data / "totalseg-ct" / "dicom")
    labels = resample_to(sitk.ReadImage(str(shared_data / "totalseg-ct" / "dicom_labels.nii.gz")), vol.geometry)
    import cv2

    for label in (1, 5, 52):  # spleen, liver, aorta
        organ = labels == label
        rebuilt = np.zeros_like(organ)
        for k in np.flatnonzero(organ.any(axis=(1, 2))):
            found, _ = cv2.findContours(organ[k].astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            polys = [c[:, 0, :].astype(float) for c in found]  # (x, y) through boundary pixel centres
            rebuilt[k] = polygons_to_mask(polys, organ.shape[1:])
        assert dice(rebuilt, organ) >= 0.98, label


def test_iso_contours_are_exact_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(40):
        m = rng.random((25, 30)) > 0.55
        polys = mask_to_polygons(m)
        assert all(len(p) >= 3 for p in polys)
        np.testing.assert_array_equal(polygons_to_mask(polys, m.shape), m)


def test_ds_values_fit_16_characters(tmp_path):
    write_series(tmp_path / "img", np.zeros((2, 12, 12)), spacing=(0.123456789, 0.987654321, 1.1111111),
                 origin=(-12345.678901, 9876.54321, -4567.891234), iop=rotation_iop(33.3, 11.1))
    vol = read_series(tmp_path / "img")
    mask = np.zeros((2, 12, 12), bool)
    mask[0, 2:9, 3:7] = True
    ds = pydicom.dcmread(write_rtstruct(vol, [RoiMask("x", mask)], tmp_path / "RS.dcm"))
    values = [str(v) for c in ds.ROIContourSequence[0].ContourSequence for v in c["ContourData"].value]
    assert values and max(len(v) for v in values) <= 16


def test_sts001_clinical_roi_roundtrip_and_dciodvfy(shared_data, tmp_path):
    """A clinician's GTV (MIM) re-written by us: same voxels, and valid although the images carry
    an over-long StudyID (17 characters for SH: we cut it, dciodvfy would flag it)."""
    vol = read_series(shared_data / "sts-001" / "CT" / "image")
    gtv = read_rtstruct(shared_data / "sts-001" / "CT" / "rtstruct" / "RS.dcm", vol).roi("GTV_Mass_CT").mask
    assert gtv.sum() > 10000
    path = write_rtstruct(vol, [RoiMask("GTV_Mass_CT", gtv, interpreted_type="GTV")], tmp_path / "RS.dcm")
    back = read_rtstruct(path, vol).roi("GTV_Mass_CT_prop").mask
    assert dice(back, gtv) >= 0.98
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == vol.study_instance_uid and ds.PatientID == vol.header.PatientID
    assert len(ds.StudyID) <= 16
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (out.stdout + out.stderr).splitlines()
    assert not [line for line in lines if line.startswith("Error")], "\n".join(lines)
