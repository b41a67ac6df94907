"""DICOM series -> Volume: ordering along the normal, geometry, rescale, and refusals with clear messages."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from converters.errors import SeriesError, SeriesIncompleteError
from converters.series import read_series
from phantoms import rotation_iop, voxel_to_patient, write_series


def _ramp(shape=(6, 12, 10)):
    z, y, x = np.indices(shape)
    return (100 * z + 10 * y + x - 500).astype(np.float64)  # unique, asymmetric in every axis


def test_real_ct_jpeg2000_empty_sop_class(shared_data):
    vol = read_series(shared_data / "totalseg-ct" / "dicom")
    assert vol.array.shape == (20, 512, 512)
    assert vol.modality == "CT"
    assert vol.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"  # from file meta: the dataset's is empty
    assert len(set(vol.sop_instance_uids)) == 20 and all(vol.sop_instance_uids)
    assert vol.geometry.spacing_mm == pytest.approx((0.9765625, 0.9765625, 2.0))
    # ordered by position, not file name: z increases with index
    zs = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in vol.files]
    assert np.all(np.diff(zs) == pytest.approx(2.0))
    assert vol.geometry.origin_mm[2] == pytest.approx(min(zs))
    assert vol.header is not None and "PixelData" not in vol.header
    assert -1100 < vol.array.min() < -900 and vol.array.max() > 500  # HU after the -1024 intercept
    assert vol.frame_of_reference_uid.startswith("1.3.12.2.1107")


def test_real_mr_series(shared_data):
    vol = read_series(shared_data / "sts-001" / "MR_T1" / "image")
    assert vol.modality == "MR" and vol.array.shape[0] == 59
    assert vol.geometry.spacing_mm[2] == pytest.approx(3.27, abs=1e-3)


def test_order_rescale_and_uids(tmp_path):
    arr = _ramp()
    files = write_series(tmp_path, arr, spacing=(0.8, 0.9, 2.5), origin=(-10, 20, 30), rescale_slope=2.0,
                         rescale_intercept=-1000)
    vol = read_series(tmp_path)
    np.testing.assert_allclose(vol.array, arr, atol=1.0)  # slope 2 quantises to 2 HU steps
    assert vol.files == files
    assert vol.sop_instance_uids == [pydicom.dcmread(f).SOPInstanceUID for f in files]
    assert vol.geometry.origin_mm == pytest.approx((-10, 20, 30))
    assert vol.geometry.spacing_mm == pytest.approx((0.8, 0.9, 2.5))
    ds = pydicom.dcmread(files[0])
    assert vol.series_instance_uid == ds.SeriesInstanceUID and vol.study_instance_uid == ds.StudyInstanceUID


def test_oblique_geometry_matches_dicom(tmp_path):
    iop = rotation_iop(30, 20)
    arr = _ramp()
    write_series(tmp_path, arr, spacing=(0.7, 1.1, 3.0), origin=(5, -7, 11), iop=iop)
    vol = read_series(tmp_path)
    np.testing.assert_allclose(vol.array, arr)
    k, r, c = 4, 7, 3
    expected = voxel_to_patient(np.array([k, r, c]), (0.7, 1.1, 3.0), (5, -7, 11), iop)
    np.testing.assert_allclose(vol.geometry.index_to_patient([c, r, k]), expected, atol=1e-4)
    np.testing.assert_allclose(vol.geometry.patient_to_index(expected), [c, r, k], atol=1e-4)


def test_feet_first_is_reversed_along_normal(tmp_path):
    arr = _ramp()
    write_series(tmp_path, arr, spacing=(1, 1, 2), origin=(0, 0, 100), slice_step_sign=-1)
    vol = read_series(tmp_path)
    np.testing.assert_allclose(vol.array, arr[::-1])
    assert vol.geometry.origin_mm[2] == pytest.approx(100 - 2 * 5)
    assert vol.geometry.direction_matrix[:, 2] == pytest.approx([0, 0, 1])


def test_negative_normal_orientation(tmp_path):
    """Rows along -x (normal -z): slice index still grows along the normal, geometry stays right."""
    arr = _ramp()
    iop = (-1, 0, 0, 0, 1, 0)
    write_series(tmp_path, arr, spacing=(1, 1, 2), origin=(0, 0, 0), iop=iop)
    vol = read_series(tmp_path)
    np.testing.assert_allclose(vol.array, arr)
    assert vol.geometry.direction_matrix[:, 2] == pytest.approx([0, 0, -1])
    expected = voxel_to_patient(np.array([3, 2, 1]), (1, 1, 2), (0, 0, 0), iop)
    np.testing.assert_allclose(vol.geometry.index_to_patient([1, 2, 3]), expected, atol=1e-6)


def test_two_series_named(tmp_path):
    write_series(tmp_path, _ramp(), series_instance_uid="1.2.3.4.100")
    write_series(tmp_path / "b", _ramp(), series_instance_uid="1.2.3.4.200")
    for f in (tmp_path / "b").iterdir():
        f.rename(tmp_path / ("B_" + f.name))
    with pytest.raises(SeriesError, match=r"1\.2\.3\.4\.100.*1\.2\.3\.4\.200"):
        read_series(tmp_path)
    assert read_series(tmp_path, "1.2.3.4.200").series_instance_uid == "1.2.3.4.200"


def test_missing_slice_named(tmp_path):
    files = write_series(tmp_path, _ramp(), spacing=(1, 1, 2), origin=(0, 0, 10), shuffle_names=False)
    files[3].unlink()  # slice at z = 16
    with pytest.raises(SeriesIncompleteError, match=r"1 slice\(s\) missing.*16\.00"):
        read_series(tmp_path)


def test_non_uniform_spacing(tmp_path):
    files = write_series(tmp_path, _ramp(), spacing=(1, 1, 2), shuffle_names=False)
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = [0, 0, 4.7]
    ds.save_as(files[2])
    with pytest.raises(SeriesIncompleteError, match="non-uniform"):
        read_series(tmp_path)


def test_duplicate_position(tmp_path):
    files = write_series(tmp_path, _ramp(), spacing=(1, 1, 2), shuffle_names=False)
    shutil.copy(files[2], tmp_path / "copy.dcm")
    ds = pydicom.dcmread(tmp_path / "copy.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "copy.dcm")
    with pytest.raises(SeriesIncompleteError, match="duplicate"):
        read_series(tmp_path)


def test_mixed_orientation(tmp_path):
    files = write_series(tmp_path, _ramp(), shuffle_names=False)
    ds = pydicom.dcmread(files[1])
    ds.ImageOrientationPatient = list(rotation_iop(5))
    ds.save_as(files[1])
    with pytest.raises(SeriesError, match=f"mixed orientations.*{files[1].name}"):
        read_series(tmp_path)


def test_gantry_tilt(tmp_path):
    files = write_series(tmp_path, _ramp(), spacing=(1, 1, 2), shuffle_names=False)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [0, 0.5 * k, 2.0 * k]  # y drifts with z: tilted stack
        ds.save_as(f)
    with pytest.raises(SeriesError, match="gantry tilt"):
        read_series(tmp_path)


def test_multiframe_refused(tmp_path):
    files = write_series(tmp_path, _ramp())
    ds = pydicom.dcmread(files[0])
    ds.NumberOfFrames = 3
    ds.save_as(files[0])
    with pytest.raises(SeriesError, match=f"{files[0].name}.*multi-frame"):
        read_series(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_named(tmp_path, damage):
    files = write_series(tmp_path, _ramp())
    victim = files[2]
    data = victim.read_bytes()
    victim.write_bytes(b"\x00\x01garbage" * 10 if damage == "garbage" else data[: len(data) - 100])
    with pytest.raises(SeriesError, match=victim.name):
        read_series(tmp_path)


def test_non_image_objects_skipped(shared_data, tmp_path):
    """The ARIA folder holds 4 CT slices and their RTSTRUCT: the RTSTRUCT is not a second series."""
    vol = read_series(shared_data / "vendor-rtstruct" / "aria-16.1-anon-ct")
    assert vol.array.shape[0] == 4 and vol.modality == "CT"


def test_monaco_without_preamble(shared_data):
    vol = read_series(shared_data / "vendor-rtstruct" / "monaco" / "tiny-with-ct")
    assert vol.array.shape == (5, 5, 5)


# --------------------------------------------------------------------------- one contiguity rule (issue 10, defect 5)
def _stack(tmp_path, name: str, positions_mm, *, thickness_mm: float, numbers=None) -> list[Path]:
    """A series of len(positions) slices at these z positions, SliceThickness and InstanceNumbers as given."""
    files = write_series(tmp_path / name, np.zeros((len(positions_mm), 8, 8)), spacing=(1, 1, thickness_mm),
                         shuffle_names=False)
    for k, (path, z) in enumerate(zip(files, positions_mm)):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [0, 0, float(z)]
        ds.SliceThickness = f"{thickness_mm:g}"
        ds.InstanceNumber = int(numbers[k]) if numbers is not None else k + 1
        ds.save_as(path)
    return files


def _both(files):
    """(completion's verdict, the reader's verdict) on the same files: they must always agree."""
    from converters.series import check_series_files

    verdict = check_series_files(files)
    try:
        read_series(files[0].parent)
        read = True, ""
    except SeriesIncompleteError as exc:
        read = False, str(exc)
    return verdict, read


def test_five_percent_uneven_is_refused_by_completion_and_reader_alike(tmp_path):
    z = [0, 3.0, 6.0, 9.15, 12.15, 15.15]  # one step 5 % long: passed the old 10 % completion rule, then failed
    verdict, (read_ok, _) = _both(_stack(tmp_path, "uneven", z, thickness_mm=3.0))
    assert not verdict.ok and not read_ok and "non-uniform" in verdict.reason and "3.150 mm after 6.00" in verdict.reason


def test_every_other_slice_missing_is_not_a_complete_series(tmp_path):
    # the defect's case: spacing 6.54 mm, SliceThickness 3.27 mm, InstanceNumbers 1, 3, 5, ...
    z = [6.54 * k for k in range(10)]
    verdict, (read_ok, message) = _both(_stack(tmp_path, "half", z, thickness_mm=3.27,
                                               numbers=[2 * k + 1 for k in range(10)]))
    assert not verdict.ok and not read_ok
    assert "one slice in 2" in verdict.reason and "3.27" in verdict.reason and len(verdict.missing_mm) == 9
    assert "one slice in 2" in message


def test_a_gapped_protocol_numbered_consecutively_is_complete(tmp_path):
    # MR with a slice gap: 5 mm slices every 6.5 mm, numbered 1, 2, 3 ...; also 3 mm slices every 6 mm
    for name, thickness, spacing in (("mr", 5.0, 6.5), ("ct", 3.0, 6.0)):
        verdict, (read_ok, message) = _both(_stack(tmp_path, name, [spacing * k for k in range(8)],
                                                   thickness_mm=thickness))
        assert verdict.ok and read_ok, (name, verdict.reason, message)


@pytest.mark.parametrize("z", [
    [0, 2, 4, 6, 8, 10],             # even
    [0, 2, 4, 8, 10, 12],            # one missing
    [0, 2, 4, 6.02, 8, 10],          # 1 % jitter: scanner rounding, accepted
    [0, 2, 4, 6.3, 8, 10],           # 15 % off
    [0, 2, 4, 6, 11, 16, 21],        # 2 mm through the target, 5 mm elsewhere: not supported
])
def test_completion_and_reader_agree(tmp_path, z):
    verdict, (read_ok, message) = _both(_stack(tmp_path, "s", z, thickness_mm=2.0))
    assert verdict.ok == read_ok, (verdict.reason, message)
