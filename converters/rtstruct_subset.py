"""A copy of an RTSTRUCT holding only some of its ROIs (a reviewer accepted these, rejected the rest).

Everything else is kept as written and checked (geometry, references, formatting); the copy gets a
new SOP Instance UID, because it is a different object from the one first validated.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from pydicom import dcmread
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from converters.errors import RTStructError


def keep_rois(path: str | Path, names: Sequence[str], out: str | Path) -> Path:
    """Write to `out` the RTSTRUCT at `path` with only the ROIs called `names`; `RTStructError` if one is missing."""
    ds = dcmread(path)
    numbers = {str(item.ROIName): int(item.ROINumber) for item in ds.StructureSetROISequence}
    missing = [n for n in names if n not in numbers]
    if missing or not names:
        raise RTStructError(f"{path}: cannot keep ROIs {list(names)}: not in the file ({', '.join(numbers)})")
    keep = {numbers[n] for n in names}
    ds.StructureSetROISequence = DicomSequence([i for i in ds.StructureSetROISequence if int(i.ROINumber) in keep])
    ds.ROIContourSequence = DicomSequence([i for i in ds.ROIContourSequence
                                           if int(i.ReferencedROINumber) in keep])
    if "RTROIObservationsSequence" in ds:
        ds.RTROIObservationsSequence = DicomSequence([i for i in ds.RTROIObservationsSequence
                                                      if int(i.ReferencedROINumber) in keep])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=".rtstruct-", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
