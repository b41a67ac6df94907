"""Volume <-> NPZ / NIfTI / MHA and masks on the volume's grid."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from converters.errors import ConversionError
from converters.series import read_series
from converters.volume_io import read_mask, read_npz, read_volume, resample_to, write_mask, write_npz, write_volume
from phantoms import rotation_iop, write_series


@pytest.fixture()
def oblique_volume(tmp_path):
    z, y, x = np.indices((5, 14, 11))
    arr = (50 * z + 7 * y - 3 * x).astype(float)
    write_series(tmp_path / "dcm", arr, spacing=(0.7, 0.9, 2.5), origin=(-30, 12, 40), iop=rotation_iop(30, 15),
                 modality="MR", rescale_intercept=0)
    return read_series(tmp_path / "dcm")


def test_npz_keys_no_pickle_and_roundtrip(oblique_volume, tmp_path):
    labels = np.zeros(oblique_volume.array.shape, np.uint8)
    labels[1:3, 4:9, 2:6] = 3
    path = write_npz(tmp_path / "v.npz", oblique_volume, gts=labels)
    with np.load(path, allow_pickle=False) as data:
        assert {"imgs", "gts", "spacing", "origin", "direction", "sop_instance_uids",
                "frame_of_reference_uid", "series_instance_uid"} <= set(data.files)
        assert data["imgs"].shape == (5, 14, 11)  # (z, y, x)
        np.testing.assert_allclose(data["spacing"], (0.7, 0.9, 2.5))  # SimpleITK GetSpacing order (x, y, z)
        assert all(data[k].dtype != object for k in data.files)
    back = read_npz(path)
    np.testing.assert_array_equal(back.array, oblique_volume.array)
    assert back.geometry == oblique_volume.geometry
    assert back.sop_instance_uids == oblique_volume.sop_instance_uids
    assert back.frame_of_reference_uid == oblique_volume.frame_of_reference_uid
    assert back.series_instance_uid == oblique_volume.series_instance_uid and back.modality == "MR"
    np.testing.assert_array_equal(read_mask(path), labels)


def test_npz_normalised_ct_window(tmp_path):
    arr = np.full((2, 4, 4), -1000.0)
    arr[0, 0, 0], arr[0, 0, 1], arr[0, 0, 2] = 40, 240, -160
    write_series(tmp_path / "ct", arr)
    vol = read_series(tmp_path / "ct")
    from models.preprocess import normalise

    path = write_npz(tmp_path / "n.npz", vol, normalised=normalise(vol.array, vol.modality))
    with np.load(path, allow_pickle=False) as data:
        imgs = data["imgs"]
        assert imgs.dtype == np.uint8 and str(data["intensity"]) == "normalised_uint8"
        assert (imgs[0, 0, 0], imgs[0, 0, 1], imgs[0, 0, 2], imgs[1, 3, 3]) == (128, 255, 0, 0)  # 40/400 window


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nii"])
def test_sitk_formats_keep_geometry(oblique_volume, tmp_path, suffix):
    path = write_volume(tmp_path / f"v{suffix}", oblique_volume)
    back = read_volume(path)
    np.testing.assert_allclose(back.array, oblique_volume.array)
    np.testing.assert_allclose(back.geometry.origin_mm, oblique_volume.geometry.origin_mm, atol=1e-4)
    np.testing.assert_allclose(back.geometry.spacing_mm, oblique_volume.geometry.spacing_mm, atol=1e-5)
    np.testing.assert_allclose(back.geometry.direction, oblique_volume.geometry.direction, atol=1e-5)
    assert not list(tmp_path.glob(".tmp-*"))  # temporary renamed away


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".npz"])
def test_mask_roundtrip(oblique_volume, tmp_path, suffix):
    mask = np.zeros(oblique_volume.array.shape, bool)
    mask[2, 3:8, 1:4] = True
    path = write_mask(tmp_path / f"m{suffix}", mask, oblique_volume.geometry)
    np.testing.assert_array_equal(read_mask(path).astype(bool), mask)
    back = read_volume(path)
    np.testing.assert_allclose(back.geometry.origin_mm, oblique_volume.geometry.origin_mm, atol=1e-4)
    np.testing.assert_allclose(back.geometry.direction, oblique_volume.geometry.direction, atol=1e-5)


def test_mask_wrong_shape_refused(oblique_volume, tmp_path):
    with pytest.raises(ConversionError, match="m.nii.gz"):
        write_mask(tmp_path / "m.nii.gz", np.zeros((2, 2, 2), bool), oblique_volume.geometry)
    assert not (tmp_path / "m.nii.gz").exists()


def test_read_volume_dispatch(shared_data, tmp_path):
    vol = read_volume(shared_data / "totalseg-ct" / "ct_3mm.nii.gz")
    assert vol.array.shape == (30, 101, 122) and vol.geometry.spacing_mm == pytest.approx((3, 3, 3))
    assert read_volume(shared_data / "sts-001" / "CT" / "image").modality == "CT"
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ConversionError, match="x.txt"):
        read_volume(tmp_path / "x.txt")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ConversionError, match="bad.npz"):
        read_volume(tmp_path / "bad.npz")


def test_modality_inferred_for_files_without_a_header(shared_data, tmp_path):
    # NIfTI/MHA carry no Modality; the propagators treat CT (HU) and MR (percentiles) differently
    assert read_volume(shared_data / "totalseg-ct" / "ct_3mm.nii.gz").modality == "CT"
    mr = read_series(shared_data / "sts-001" / "MR_T1" / "image").array.astype(np.float32)
    ct = read_series(shared_data / "sts-001" / "CT" / "image").array.astype(np.float32)
    rng = np.random.default_rng(0)
    soft = np.where(rng.random(ct.shape) < 0.3, -100.0, 45.0) + rng.normal(0, 10, ct.shape)  # fat + muscle, no air
    cases = {"mr_raw": (mr, ""), "mr_zscore": ((mr - mr.mean()) / mr.std(), ""), "ct": (ct, "CT"),
             "ct_inside_body": (soft.astype(np.float32), "CT")}
    for name, (array, expected) in cases.items():
        path = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
        assert read_volume(path).modality == expected, name


def test_labels_align_through_physical_space(shared_data):
    """The NIfTI label map is y-flipped relative to the series: resampling fixes it (liver ~ 89 HU)."""
    vol = read_series(shared_data / "totalseg-ct" / "dicom")
    labels = resample_to(sitk.ReadImage(str(shared_data / "totalseg-ct" / "dicom_labels.nii.gz")), vol.geometry)
    assert labels.shape == vol.array.shape
    assert 80 < vol.array[labels == 5].mean() < 100
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "totalseg-ct" / "dicom_labels.nii.gz")))
    assert vol.array[raw == 5].mean() < 0  # plain arrays are mirrored: the trap this guards against
