"""RTSTRUCTs as real planning systems write them: every file parses; counts and placements as expected."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from converters.errors import RTStructError
from converters.rtstruct_read import read_rtstruct
from converters.series import read_series

V = "vendor-rtstruct"


def _one(folder, pattern):
    files = sorted(folder.glob(pattern))
    assert len(files) == 1, files
    return files[0]


def test_eclipse_roi_counts(shared_data):
    ss = read_rtstruct(_one(shared_data / V / "eclipse-8.1-prostate-phantom", "RS*.dcm"))
    assert len(ss.rois) == 16
    # The data README says 9 empty; the file has 10 ROIs without any ContourSequence
    # (CTV, Vessels - left/right, XApprox, PROS, optBladder, optRectum, X1, X2, X3).
    assert sum(r.is_empty for r in ss.rois) == 10
    assert ss.roi("bladder").interpreted_type == "AVOIDANCE" and len(ss.roi("Bladder").contours_mm) == 21


def test_xio_roi_counts_and_single_slice(shared_data):
    folder = shared_data / V / "xio-breast"
    ss = read_rtstruct(folder / "rtss.dcm")
    assert len(ss.rois) == 10
    # The data README says 2 empty; only 'Areola' has no contours in the file.
    assert [r.name for r in ss.rois if r.is_empty] == ["Areola"]
    vol = read_series(folder)  # 1 of its 98 CT slices
    ss = read_rtstruct(folder / "rtss.dcm", vol)
    body = ss.roi("BODY").mask
    assert body[0].sum() > 10000
    # contours on the 97 absent slices are reported, not dropped silently
    assert len(ss.unmatched) > 400 and all("matches no slice" in u.reason for u in ss.unmatched)


@pytest.mark.parametrize("rs, images, expected", [
    ("aria-16.1-anon-ct/RS.*.dcm", "aria-16.1-anon-ct", {"BODY": 4, "SpinalCord": 4}),
    ("mim-7.0.3-phantom/rt.dcm", "mim-7.0.3-phantom", {"ROI-1": 3, "ROI-2": 3, "ROI-3": 3, "ROI-4": 3}),
    ("rt-utils-edge/invalid_reference_rt.dcm", "mim-7.0.3-phantom", {"ROI-1": 3, "ROI-4": 3}),
    ("rt-utils-edge/non_existent_reference_rt.dcm", "mim-7.0.3-phantom", {"ROI-1": 3, "ROI-4": 3}),
    ("monaco/tiny-with-ct/TinyFS_StrctrSets.dcm", "monaco/tiny-with-ct", {"patient": 3, "tumor": 1}),
])
def test_vendor_with_images(shared_data, rs, images, expected):
    """Slices with contours per ROI, matched by position (references may be invalid or absent)."""
    rs_path = _one(shared_data / V / rs.split("/")[0], "/".join(rs.split("/")[1:]))
    vol = read_series(shared_data / V / images)
    ss = read_rtstruct(rs_path, vol)
    assert not ss.unmatched
    for name, n_slices in expected.items():
        assert int(ss.roi(name).mask.any(axis=(1, 2)).sum()) == n_slices, name


def test_aria_body_contains_cord(shared_data):
    folder = shared_data / V / "aria-16.1-anon-ct"
    vol = read_series(folder)
    ss = read_rtstruct(_one(folder, "RS.*.dcm"), vol)
    body, cord = ss.roi("BODY").mask, ss.roi("SpinalCord").mask
    assert cord.sum() > 100 and (cord & ~body).sum() == 0
    assert vol.array[body].mean() > -200 and vol.array[~body].mean() < -800  # body is tissue, outside is air


@pytest.mark.parametrize("rel", ["raystation-template/RS_template.dcm", "raystation-template/RS_template_old_empty_contour.dcm",
                                 "mim-6.9.7-pancreas/RS.dcm", "monaco/max_structure_set.dcm",
                                 "monaco/box-with-overlapping-patient-and-target.dcm"])
def test_vendor_without_images_parse(shared_data, rel):
    ss = read_rtstruct(shared_data / V / rel)
    assert ss.rois and all(r.name for r in ss.rois)
    assert all(r.mask is None for r in ss.rois)  # no series given: contours only


def test_raystation_empty_contour_reported(shared_data):
    ss = read_rtstruct(shared_data / V / "raystation-template" / "RS_template_old_empty_contour.dcm")
    assert [u.reason for u in ss.unmatched] == ["empty ContourData"]


def test_mim_pancreas_counts(shared_data):
    ss = read_rtstruct(shared_data / V / "mim-6.9.7-pancreas" / "RS.dcm")
    assert len(ss.rois) == 5 and not any(r.is_empty for r in ss.rois)


def test_corrupt_gives_clear_error(shared_data):
    path = shared_data / V / "corrupt" / "RS_eclipse_crlf_corrupted.dcm"
    with pytest.raises(RTStructError, match=r"RS_eclipse_crlf_corrupted\.dcm.*damaged"):
        read_rtstruct(path)


def test_pydicom_points(tmp_path):
    ss = read_rtstruct(get_testdata_file("rtstruct.dcm"))
    iso = ss.roi("Isocenter 1")
    assert iso.geometric_types == ["POINT"] and len(iso.points) == 1
    assert ss.roi("patient").geometric_types == ["CLOSED_PLANAR"] * 3


def test_points_on_a_series_get_voxel_indices(tmp_path):
    """POINT ROIs on a series come back in patient mm and as continuous voxel indices."""
    import pydicom
    from phantoms import write_series

    rs = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    for_uid = rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    point = np.asarray(rs.ROIContourSequence[1].ContourSequence[0].ContourData, float)
    write_series(tmp_path / "img", np.zeros((5, 20, 20)), spacing=(2, 2, 3),
                 origin=tuple(point - np.array([10, 8, 6])), frame_of_reference_uid=for_uid)
    vol = read_series(tmp_path / "img")
    ss = read_rtstruct(get_testdata_file("rtstruct.dcm"), vol)
    p = ss.roi("Isocenter 1").points[0]
    np.testing.assert_allclose(p.patient_mm, point)
    np.testing.assert_allclose(p.index_xyz, (5, 4, 2))


def test_sts001_ct_and_mr_match_by_position(shared_data):
    """sts-001's RTSTRUCTs reference the uncropped series: every contour must still land, by position."""
    for modality in ("CT", "MR_T1"):
        vol = read_series(shared_data / "sts-001" / modality / "image")
        ss = read_rtstruct(shared_data / "sts-001" / modality / "rtstruct" / "RS.dcm", vol)
        assert not set(vol.sop_instance_uids) & {
            i.ReferencedSOPInstanceUID for f in pydicom_refs(ss.path) for i in f}
        assert len(ss.rois) == 1 and not ss.unmatched
        assert int(ss.rois[0].mask.any(axis=(1, 2)).sum()) == 31


def pydicom_refs(path):
    import pydicom

    ds = pydicom.dcmread(path)
    return [c.ContourImageSequence for rc in ds.ROIContourSequence for c in rc.ContourSequence]
