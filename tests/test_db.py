"""The database layer on real SQLite files: what a unit of work may and may not do, the receive path's
Core statements held against the ORM, and the upgrade of a database made by the previous release."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from db import audit
from db.engine import NestedTransactionError, open_database, transaction
from db.instances import NewInstance, record_instance
from db.schema import AuditEntry, Instance, Job, Send, Series, utcnow

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def factory(tmp_path):
    f = open_database(tmp_path / "db.sqlite")
    yield f
    f.kw["bind"].dispose()


def test_a_transaction_inside_a_transaction_fails_at_once_instead_of_waiting_on_itself(factory):
    """The node once stalled for the 60 s busy timeout on every pass: an outer unit of work held the
    write lock while an inner one waited for it."""
    t0 = time.monotonic()
    with transaction(factory) as session:
        audit.record(session, "outer")
        with pytest.raises(NestedTransactionError):
            with transaction(factory):
                pass
    assert time.monotonic() - t0 < 5
    with factory() as session:  # the outer one still committed
        assert session.execute(select(AuditEntry.event)).scalars().all() == ["outer"]


def test_a_read_cannot_write_and_does_not_block_a_writer(factory):
    with factory() as session:
        session.execute(select(Job.id)).all()  # a read is open...
        done = threading.Event()

        def write() -> None:
            with transaction(factory) as s:
                audit.record(s, "while a read is open")
            done.set()

        t = threading.Thread(target=write)
        t.start()
        assert done.wait(5), "a read held the write lock"
        t.join()
        session.add(Job(series_instance_uid="1.2", state="queued"))
        with pytest.raises(OperationalError, match="readonly"):
            session.flush()  # ...and cannot write: every write is a unit of work of its own


def _new(uid: str, series: str = "1.2.3.2") -> NewInstance:
    return NewInstance(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_instance_uid=series,
                       study_instance_uid="1.2.3", modality="CT", patient_id_hash=audit.hash_patient_id("P1"),
                       path=f"/archive/{uid}.dcm", sha256="ab" * 32, transfer_syntax_uid="1.2.840.10008.1.2.1",
                       calling_ae="TPS", peer_address="127.0.0.1:1234", source="dimse", received_at=utcnow())


def test_the_receive_paths_core_statements_write_what_the_orm_would(tmp_path):
    """`db.instances.record_instance` (Core, fast) against the same rows made with the ORM objects."""
    fast, orm = open_database(tmp_path / "fast.sqlite"), open_database(tmp_path / "orm.sqlite")
    placed = []
    for uid in ("1.2.3.2.1", "1.2.3.2.2"):
        new = _new(uid)
        assert not record_instance(fast, new, lambda: placed.append(uid)).duplicate
        with transaction(orm) as s:
            s.add(Instance(**{k: getattr(new, k) for k in new.__dataclass_fields__}))
            series = s.execute(select(Series).where(Series.series_instance_uid == new.series_instance_uid)).scalar()
            if series is None:
                s.add(Series(series_instance_uid=new.series_instance_uid, study_instance_uid=new.study_instance_uid,
                             modality="CT", calling_ae="TPS", peer_address=new.peer_address, state="receiving",
                             instance_count=1, first_received_at=new.received_at, last_received_at=new.received_at,
                             reason="", patient_id_hash=new.patient_id_hash))
            else:
                series.instance_count += 1
                series.last_received_at = new.received_at
            s.flush()
            audit.record(s, "instance.received", component="dicom_node", study_instance_uid=new.study_instance_uid,
                         series_instance_uid=new.series_instance_uid, sop_instance_uid=uid, calling_ae="TPS",
                         patient_id_hash=new.patient_id_hash, sop_class_uid=new.sop_class_uid, sha256=new.sha256,
                         peer_address=new.peer_address)
    assert placed == ["1.2.3.2.1", "1.2.3.2.2"]
    again = record_instance(fast, _new("1.2.3.2.1"), lambda: placed.append("twice"))
    assert again.duplicate and again.existing_sha256 == "ab" * 32 and placed[-1] != "twice"

    def rows(factory):
        with factory() as s:
            inst = [{c.name: getattr(r, c.name) for c in Instance.__table__.columns if c.name not in ("id",)}
                    for r in s.execute(select(Instance).order_by(Instance.id)).scalars()]
            ser = [{c.name: getattr(r, c.name) for c in Series.__table__.columns if c.name not in ("id",)}
                   for r in s.execute(select(Series)).scalars()]
            aud = [(e.event, e.sop_instance_uid, e.patient_id_hash, e.details)
                   for e in s.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars()]
            return inst, ser, aud, audit.verify(s)

    assert rows(fast) == rows(orm)


def test_a_database_made_by_the_previous_release_is_upgraded_with_its_data(tmp_path):
    """tests/data/db-0001.sqlite was made by release f252d7f (revision 0001): a sent job, its send, a
    drop-in job known only from its audit row. After the upgrade every row is still there, the drop-in
    case and patient keys are on the jobs, the audit chain verifies and is anchored."""
    path = tmp_path / "rtprop.sqlite"
    shutil.copy(DATA / "db-0001.sqlite", path)
    factory = open_database(path)
    with transaction(factory) as s:
        jobs = s.execute(select(Job).order_by(Job.id)).scalars().all()
        sends = s.execute(select(Send)).scalars().all()
        count, problems = audit.verify(s)
        events = [e for (e,) in s.execute(select(AuditEntry.event).order_by(AuditEntry.id))]
    assert [(j.state, j.calling_ae) for j in jobs] == [("sent", "TPS"), ("received", "DROPIN")]
    assert jobs[1].dropin_case == "caseA" and jobs[0].dropin_case == ""
    assert jobs[0].patient_id_hash == audit.hash_patient_id("SYN011")
    assert [(s.state, s.outcome, s.patient_id_hash) for s in sends] == [("sent", "sent", jobs[0].patient_id_hash)]
    assert problems == [] and count == 20 and events[-1] == "audit.anchored"
    assert audit.head_of(factory).row_id == 20


def test_the_self_check_dice_of_an_old_database_is_kept_as_its_file_check_dice(tmp_path):
    """0006 renames jobs.self_check_dice (the written file read back against its masks) to file_check_dice,
    the values kept: the column says what it measures."""
    import sqlite3

    path = tmp_path / "rtprop.sqlite"
    shutil.copy(DATA / "db-0001.sqlite", path)
    with sqlite3.connect(path) as raw:  # as a worker of that release would have written it
        raw.execute("UPDATE jobs SET self_check_dice = 0.99875 WHERE id = 1")
    factory = open_database(path)
    with factory() as s:
        job = s.get(Job, 1)
    assert job.file_check_dice == 0.99875
