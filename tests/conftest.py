"""Shared fixtures: where the real data lives, and a temporary storage root per test."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RTPROP_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (set RTPROP_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def sts_gtv_slices(shared_data):
    """The middle GTV slice of sts-001 on CT and MR (image, mask, spacing_yx, modality)."""
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series

    out = []
    for folder, modality in (("CT", "CT"), ("MR_T1", "MR")):
        volume = read_series(shared_data / "sts-001" / folder / "image")
        rtstruct = next((shared_data / "sts-001" / folder / "rtstruct").glob("*.dcm"))
        gtv = np.asarray(read_rtstruct(rtstruct, volume).rois[0].mask, dtype=bool)
        slices = np.flatnonzero(gtv.any(axis=(1, 2)))
        k = int(slices[len(slices) // 2])
        out.append((volume.array[k].astype(np.float32), gtv[k], tuple(volume.geometry.spacing_zyx[1:]), modality))
    return out


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL server for the session (Debian's postgresql, installed when missing)."""
    from pg_helpers import PostgresServer

    server = PostgresServer().init()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(postgres) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return postgres.create_database()
