"""Shared fixtures: where the real data lives, and a temporary storage root per test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RTPROP_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (set RTPROP_SHARED_DATA)")
    return SHARED_DATA


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
