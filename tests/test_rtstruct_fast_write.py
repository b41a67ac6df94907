"""The RTSTRUCT writer's bulk ContourData and the per-slice memos change nothing that is written or checked.

The reference is the writer as it was: each outline traced with `mask_to_polygons`, put through
`Geometry.index_to_patient`, each coordinate formatted by `format_ds` and assigned to a pydicom element
one value at a time. The written file must be byte for byte that one, on an oblique phantom with a hole and
several pieces per slice, for a first write and for a write whose slices were traced before (memo). The file
check must still fail on a file that does not match its masks or names a wrong image, also when every slice
of the file was rasterised before.
"""
from __future__ import annotations

import copy
import datetime as dt
import io

import numpy as np
import pydicom
import pytest

from converters.contours import mask_to_polygons
from converters.rtstruct_read import RASTERISED, read_rtstruct
from converters.rtstruct_write import TRACED, RoiMask, build_rtstruct, ds_text, format_ds, write_rtstruct
from converters.series import read_series
from phantoms import rotation_iop, write_series
from pipeline.file_check import check_file

NOW = dt.datetime(2026, 1, 2, 3, 4, 5)


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _per_value_reference(ds: pydicom.Dataset, volume, masks: list[np.ndarray]) -> pydicom.Dataset:
    """`ds` with every ContourData rebuilt as the writer used to: one format_ds string per value, via pydicom."""
    ref = copy.deepcopy(ds)
    for rc, mask in zip(ref.ROIContourSequence, masks):
        expected = []
        for k in np.flatnonzero(mask.any(axis=(1, 2))):
            for xy in mask_to_polygons(mask[k]):
                ijk = np.column_stack([xy[:, 0], xy[:, 1], np.full(len(xy), float(k))])
                expected.append(volume.geometry.index_to_patient(ijk))
        items = list(rc.get("ContourSequence", []))
        assert len(items) == len(expected)
        for item, xyz in zip(items, expected):
            del item.ContourData
            item.ContourData = [format_ds(v) for v in xyz.ravel()]
            assert int(item.NumberOfContourPoints) == len(xyz)
    return ref


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """An oblique 6-slice series; an organ with a hole, a structure in three pieces, a one-pixel dot."""
    shape = (6, 96, 96)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    organ = ((y - 40) / 25.0) ** 2 + ((x - 50) / 30.0) ** 2 <= 1
    organ = np.broadcast_to(organ, shape) & (z >= 1) & (z <= 4)
    organ = organ & ~((((y - 40) / 7.0) ** 2 + ((x - 50) / 9.0) ** 2 <= 1) & (z == 2))  # a hole on slice 2
    pieces = np.zeros(shape, bool)
    pieces[:, 75:85, 10:20] = True
    pieces[:, 75:85, 30:40] = True
    pieces[2:5, 70:90, 60:63] = True
    pieces[3, 5, 5] = True  # a single pixel: a diamond
    folder = tmp_path_factory.mktemp("fast") / "ct"
    write_series(folder, np.where(organ, 60, 0).astype(np.int16), spacing=(0.77, 0.77, 2.5),
                 origin=(-123.456789, 87.65, -301.2), iop=rotation_iop(17.0, 4.0))
    return read_series(folder), [organ, pieces]


def test_written_file_is_the_per_value_writers_byte_for_byte(phantom):
    volume, masks = phantom
    rois = [RoiMask("Organ", masks[0]), RoiMask("Pieces", masks[1])]
    TRACED.clear()
    first = build_rtstruct(volume, rois, uid_seed="job-7", now=NOW)
    again = build_rtstruct(volume, rois, uid_seed="job-7", now=NOW)  # every slice from the memo
    reference = _bytes(_per_value_reference(first, volume, masks))
    assert _bytes(first) == reference
    assert _bytes(again) == reference
    read = pydicom.dcmread(io.BytesIO(reference))
    values = [v for rc in read.ROIContourSequence for c in rc.ContourSequence for v in c.ContourData]
    assert all(len(v.original_string) <= 16 for v in values)
    assert any("." not in v.original_string for v in values)  # whole numbers written without ".0000"


def test_ds_text_is_format_ds_joined():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 400, 5000), rng.normal(0, 1e-4, 500), np.round(rng.normal(0, 400, 500), 1),
                             np.round(rng.normal(0, 400, 500)),
                             [0.0, -0.0, -0.00004, 0.00005, -0.00005, 0.00015, 10.0, -100.0, 999999999.99994,
                              -123456789.98765, 1e9, -2.5e12, 1.23456789012e15]])
    assert ds_text(values) == "\\".join(format_ds(v) for v in values)
    with pytest.raises(Exception, match="not finite"):
        ds_text(np.array([1.0, np.nan]))


def test_check_catches_a_changed_file_when_every_slice_was_checked_before(phantom, tmp_path):
    volume, masks = phantom
    rois = [RoiMask("Organ", masks[0]), RoiMask("Pieces", masks[1])]
    path = write_rtstruct(volume, rois, tmp_path / "good.dcm", uid_seed="job-8")
    assert check_file(path, volume, masks, 0.99).ok  # every slice now rasterised once (memo)
    assert len(RASTERISED._items) > 0

    # the same file against a mask it does not carry
    other = masks[0].copy()
    other[2] = False
    bad = check_file(path, volume, [other, masks[1]], 0.99)
    assert not bad.ok and "Dice" in "; ".join(bad.problems)

    # one contour moved 3 mm in the file
    ds = pydicom.dcmread(path)
    contour = ds.ROIContourSequence[0].ContourSequence[3]
    xyz = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
    xyz[:, 0] += 3.0
    contour.ContourData = [format_ds(v) for v in xyz.ravel()]
    ds.save_as(tmp_path / "moved.dcm", enforce_file_format=True)
    moved = check_file(tmp_path / "moved.dcm", volume, masks, 0.99)
    assert not moved.ok and "Dice" in "; ".join(moved.problems)

    # one contour naming an image that is not a slice of the series
    ds = pydicom.dcmread(path)
    ds.ROIContourSequence[1].ContourSequence[0].ContourImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    ds.save_as(tmp_path / "foreign.dcm", enforce_file_format=True)
    foreign = check_file(tmp_path / "foreign.dcm", volume, masks, 0.99)
    assert not foreign.ok and "1.2.3.4" in "; ".join(foreign.problems)


def test_reader_takes_padded_spaced_and_empty_values(phantom, tmp_path):
    """ContourData parsed from the file's bytes as pydicom would: spaces around values, an empty value skipped."""
    volume, masks = phantom
    path = write_rtstruct(volume, [RoiMask("Organ", masks[0])], tmp_path / "rs.dcm", uid_seed="job-9")
    ds = pydicom.dcmread(path)
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    values = [str(v) for v in contour.ContourData]
    expected = np.asarray([float(v) for v in values]).reshape(-1, 3)
    raw = "\\".join([f" {values[0]}", *values[1:5], "", *values[5:]]).encode()
    raw += b" " * (len(raw) % 2)
    contour["ContourData"] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag("ContourData"), "DS", len(raw), raw,
                                                             0, False, True)
    contour.set_original_encoding(False, True, contour._character_set)
    ds.save_as(tmp_path / "spaced.dcm", enforce_file_format=True)
    roi = read_rtstruct(tmp_path / "spaced.dcm", volume).rois[0]
    np.testing.assert_array_equal(roi.contours_mm[0], expected)
    assert (roi.mask == masks[0]).all()
