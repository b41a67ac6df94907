"""Bad input gives a clear, catchable error naming the file/UID, and nothing is written half-way."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from config.schema import RTStructConfig
from converters import rtstruct_write
from converters.errors import ConversionError, RTStructError
from converters.rtstruct_read import read_rtstruct
from converters.rtstruct_write import RoiMask, build_rtstruct, format_ds, roi_name_for_tps, write_rtstruct
from converters.series import read_series
from converters.volume_io import read_volume, write_volume
from phantoms import write_series


@pytest.fixture()
def series(tmp_path):
    write_series(tmp_path / "img", np.zeros((4, 16, 16)), frame_of_reference_uid="1.2.3.999.1")
    return read_series(tmp_path / "img")


def _mask(vol):
    m = np.zeros(vol.array.shape, bool)
    m[1:3, 4:10, 5:9] = True
    return m


def test_other_frame_of_reference_names_both(series, tmp_path):
    path = write_rtstruct(series, [RoiMask("a", _mask(series))], tmp_path / "RS.dcm")
    write_series(tmp_path / "other", np.zeros((4, 16, 16)), frame_of_reference_uid="1.2.3.999.2")
    other = read_series(tmp_path / "other")
    with pytest.raises(RTStructError, match=r"1\.2\.3\.999\.1.*1\.2\.3\.999\.2"):
        read_rtstruct(path, other)


def test_not_an_rtstruct(series):
    with pytest.raises(RTStructError, match=series.files[0].name):
        read_rtstruct(series.files[0], series)


def test_truncated_rtstruct(series, tmp_path):
    path = write_rtstruct(series, [RoiMask("a", _mask(series))], tmp_path / "RS.dcm")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(path.read_bytes()[:700])
    with pytest.raises(RTStructError, match="broken.dcm"):
        read_rtstruct(broken, series)


def test_contour_off_every_slice_is_reported(series, tmp_path):
    path = write_rtstruct(series, [RoiMask("a", _mask(series))], tmp_path / "RS.dcm")
    ds = pydicom.dcmread(path)
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    pts = np.asarray(contour.ContourData, float).reshape(-1, 3)
    pts[:, 2] += 1.0  # half-way between two 2 mm slices
    contour.ContourData = [f"{v:.4f}" for v in pts.ravel()]
    ds.save_as(path)
    ss = read_rtstruct(path, series)
    assert len(ss.unmatched) == 1 and "matches no slice" in ss.unmatched[0].reason
    assert ss.unmatched[0].roi_name == "a_prop"
    assert ss.rois[0].mask.sum() == _mask(series).sum() // 2  # the other slice still there


def test_writer_refuses_and_leaves_nothing(series, tmp_path):
    out = tmp_path / "out" / "RS.dcm"
    with pytest.raises(RTStructError, match=r"'bad'.*\(2, 2, 2\)"):
        write_rtstruct(series, [RoiMask("bad", np.zeros((2, 2, 2), bool))], out)
    with pytest.raises(RTStructError, match="NOT_A_TYPE"):
        write_rtstruct(series, [RoiMask("a", _mask(series), interpreted_type="NOT_A_TYPE")], out)
    with pytest.raises(RTStructError, match="colour"):
        write_rtstruct(series, [RoiMask("a", _mask(series), color=(300, 0, 0))], out)
    with pytest.raises(RTStructError, match="no ROIs"):
        write_rtstruct(series, [], out)
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_writer_failure_during_save_keeps_old_file(series, tmp_path, monkeypatch):
    out = write_rtstruct(series, [RoiMask("a", _mask(series))], tmp_path / "RS.dcm")
    before = out.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", boom)
    with pytest.raises(OSError):
        write_rtstruct(series, [RoiMask("b", _mask(series))], out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["RS.dcm"]  # no temporary left


def test_writer_needs_a_dicom_series(series, tmp_path):
    nifti = read_volume(write_volume(tmp_path / "v.nii.gz", series))
    with pytest.raises(RTStructError, match="SOP Instance UIDs"):
        write_rtstruct(nifti, [RoiMask("a", _mask(series))], tmp_path / "RS.dcm")
    assert isinstance(RTStructError("x"), ConversionError)


def test_validator_catches_contour_on_wrong_slice(series, monkeypatch):
    real = rtstruct_write._contour_items

    def shifted(volume, mask, sop_class):
        items = real(volume, mask, sop_class)
        items[0].ContourImageSequence[0].ReferencedSOPInstanceUID = volume.sop_instance_uids[0]
        return items

    monkeypatch.setattr(rtstruct_write, "_contour_items", shifted)
    with pytest.raises(RTStructError, match="not on slice 0"):
        build_rtstruct(series, [RoiMask("a", _mask(series))])


def test_names_and_settings(series):
    settings = RTStructConfig(roi_suffix="_AI", roi_color=(10, 20, 30), roi_interpreted_type="OAR",
                              structure_set_label="AUTO")
    ds = build_rtstruct(series, [RoiMask("Parotid_Left_Superficial", _mask(series)),
                                 RoiMask("Parotid_Left_Superficial_2", _mask(series)),
                                 RoiMask("empty", np.zeros(series.array.shape, bool))], settings)
    names = [r.ROIName for r in ds.StructureSetROISequence]
    assert names[:2] == ["Parotid_Left__AI", "Parotid_Lef~2_AI"] and all(len(n) <= 16 for n in names)
    assert names[2] == "empty_AI" and "ContourSequence" not in ds.ROIContourSequence[2]
    assert ds.StructureSetLabel == "AUTO" and list(ds.ROIContourSequence[0].ROIDisplayColor) == [10, 20, 30]
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == "OAR"
    assert roi_name_for_tps("GTV_prop", "_prop") == "GTV_prop"  # suffix not doubled


@pytest.mark.parametrize("value, text", [(-12345.678901234, "-12345.6789"), (0.0, "0"), (-0.00001, "0"),
                                         (123.5, "123.5"), (-1.23456789e9, "-1234567890")])
def test_format_ds(value, text):
    assert format_ds(value) == text and len(text) <= 16
