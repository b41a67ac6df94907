"""The audit chain on a real SQLite file: append-only, and any single altered row is detected."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DatabaseError

from db import audit
from db.engine import open_database, transaction
from db.schema import AuditEntry


def _fill(path, n=5):
    factory = open_database(path)
    key = audit.site_key(factory)
    with transaction(factory) as session:
        for i in range(n):
            audit.record(session, "test.event", component="test", calling_ae="TPS",
                         study_instance_uid=f"1.2.3.{i}", patient_id_hash=audit.hash_patient_id("PAT1", key), step=i)
    return factory


def test_intact_chain_verifies(tmp_path):
    factory = _fill(tmp_path / "db.sqlite")
    with transaction(factory) as session:
        count, problems = audit.verify(session)
    assert count == 5 and problems == []


def test_update_and_delete_are_refused_by_the_database(tmp_path):
    factory = _fill(tmp_path / "db.sqlite")
    with pytest.raises(DatabaseError, match="append-only"):
        with transaction(factory) as session:
            session.get(AuditEntry, 2).event = "forged"
    with pytest.raises(DatabaseError, match="append-only"):
        with transaction(factory) as session:
            session.delete(session.get(AuditEntry, 3))


@pytest.mark.parametrize("column,value", [("details", '{"step":99}'), ("calling_ae", "EVIL"), ("at", "2020-01-01")])
def test_single_altered_row_is_detected(tmp_path, column, value):
    path = tmp_path / "db.sqlite"
    factory = _fill(path)
    raw = sqlite3.connect(path)  # an attacker with file access can drop the trigger; the chain still tells
    raw.execute("DROP TRIGGER audit_no_update")
    raw.execute(f"UPDATE audit SET {column} = ? WHERE id = 3", (value,))
    raw.commit()
    raw.close()
    with transaction(factory) as session:
        _, problems = audit.verify(session)
    assert [p.row_id for p in problems] == [3]


def test_deleted_row_is_detected(tmp_path):
    path = tmp_path / "db.sqlite"
    factory = _fill(path)
    raw = sqlite3.connect(path)
    raw.execute("DROP TRIGGER audit_no_delete")
    raw.execute("DELETE FROM audit WHERE id = 2")
    raw.commit()
    raw.close()
    with transaction(factory) as session:
        _, problems = audit.verify(session)
    assert [p.row_id for p in problems] == [3]


def test_cli_verify_and_export(tmp_path):
    path = tmp_path / "rtprop.sqlite"
    _fill(path)
    run = [sys.executable, "-m", "cli"]
    ok = subprocess.run(run + ["audit", "verify", "--storage", str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["rows"] == 5
    csv_out = subprocess.run(run + ["audit", "export", "--storage", str(tmp_path), "--csv", "--patient-id", "PAT1"],
                             capture_output=True, text=True)
    assert csv_out.returncode == 0 and len(csv_out.stdout.strip().splitlines()) == 6  # header + 5
    assert "PAT1" not in csv_out.stdout  # only the hash is stored
    raw = sqlite3.connect(path)
    raw.execute("DROP TRIGGER audit_no_update")
    raw.execute("UPDATE audit SET event = 'forged' WHERE id = 4")
    raw.commit()
    raw.close()
    bad = subprocess.run(run + ["audit", "verify", "--storage", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 3
    assert json.loads(bad.stdout)["problems"][0]["row_id"] == 4


def test_concurrent_writers_keep_one_chain(tmp_path):
    """Two processes appending at once must not fork the chain (BEGIN IMMEDIATE serialises them)."""
    path = tmp_path / "db.sqlite"
    open_database(path)
    code = (
        "import sys; from db.engine import open_database, transaction; from db import audit\n"
        "f = open_database(sys.argv[1])\n"
        "for i in range(100):\n"
        "    with transaction(f) as s: audit.record(s, 'race', step=i)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)]) for _ in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    factory = open_database(path)
    with transaction(factory) as session:
        count, problems = audit.verify(session)
    assert count == 300 and problems == []
    assert audit.head_of(factory).row_id == 300  # the anchor follows the last commit of any writer


def _drop_last_rows(path, n):
    raw = sqlite3.connect(path)
    raw.execute("DROP TRIGGER audit_no_delete")
    raw.execute("DELETE FROM audit WHERE id > (SELECT MAX(id) FROM audit) - ?", (n,))
    raw.commit()
    raw.close()


def test_rows_deleted_from_the_end_are_detected_by_the_head_anchor(tmp_path):
    path = tmp_path / "db.sqlite"
    factory = _fill(path)
    assert audit.head_of(factory) == audit.Head(5, _last_hash(path))
    _drop_last_rows(path, 2)  # the chain that is left is consistent in itself
    with transaction(factory) as session:
        _, problems = audit.verify(session)
        assert audit.verify(session, head=None) == (3, [])
    assert len(problems) == 1 and problems[0].row_id == 5 and "deleted from the end" in problems[0].reason


def test_a_missing_head_anchor_is_a_problem_not_a_pass(tmp_path):
    path = tmp_path / "db.sqlite"
    factory = _fill(path)
    audit.head_of(factory)
    (tmp_path / "db.sqlite.audit-head").unlink()
    with transaction(factory) as session:
        _, problems = audit.verify(session)
    assert "missing" in problems[0].reason


def test_cli_verify_fails_after_deleting_the_last_rows(tmp_path):
    path = tmp_path / "rtprop.sqlite"
    _fill(path)
    _drop_last_rows(path, 1)
    run = [sys.executable, "-m", "cli", "audit", "verify", "--storage", str(tmp_path)]
    bad = subprocess.run(run, capture_output=True, text=True)
    assert bad.returncode == 3, bad.stdout + bad.stderr
    assert json.loads(bad.stdout)["ok"] is False


def _last_hash(path) -> str:
    raw = sqlite3.connect(path)
    try:
        return raw.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()[0]
    finally:
        raw.close()


def test_the_patient_pseudonym_is_keyed_with_a_file_outside_the_database_which_must_stay_the_same(tmp_path):
    """Issue 22: a keyed hash (HMAC-SHA256) with the site's key, not the unsalted SHA-256 a 7-digit MRN is found
    from by trying every number. Fails on the code before it (no key, no HMAC)."""
    import hashlib
    import hmac
    import shutil

    path = tmp_path / "db.sqlite"
    factory = _fill(path)
    key_file = tmp_path / "db.sqlite.key"
    key = key_file.read_bytes()
    assert len(key) == 32 and key_file.stat().st_mode & 0o777 == 0o600
    with factory() as session:
        stored = {e.patient_id_hash for e in session.execute(select(AuditEntry)).scalars()}
    assert stored == {hmac.new(key, b"PAT1", hashlib.sha256).hexdigest()}
    assert hashlib.sha256(b"PAT1").hexdigest() not in stored
    factory.kw["bind"].dispose()
    shutil.move(key_file, tmp_path / "elsewhere.key")
    with pytest.raises(audit.SiteKeyError, match="missing"):
        open_database(path)
    key_file.write_bytes(b"x" * 32)
    with pytest.raises(audit.SiteKeyError, match="not the key"):
        open_database(path)
    again = open_database(path, key_path=tmp_path / "elsewhere.key")  # storage.pseudonym_key_file
    assert audit.site_key(again) == key


def test_rows_of_the_previous_release_still_verify_and_are_found_by_patient_beside_new_ones(tmp_path):
    """tests/data/db-0001.sqlite carries the unsalted hash of SYN011; after the upgrade its chain verifies and a
    query by Patient ID finds those rows and the new, keyed ones."""
    import shutil
    from pathlib import Path

    path = tmp_path / "rtprop.sqlite"
    shutil.copy(Path(__file__).parent / "data" / "db-0001.sqlite", path)
    factory = open_database(path)
    with transaction(factory) as session:
        old = len(audit.query(session, patient_id="SYN011"))
        audit.record(session, "test.event", component="test",
                     patient_id_hash=audit.hash_patient_id("SYN011", audit.site_key(factory)))
    with factory() as session:
        found = audit.query(session, patient_id="SYN011")
        count, problems = audit.verify(session)
    assert old >= 3 and len(found) == old + 1 and found[-1].event == "test.event"
    assert problems == [] and count == 21
