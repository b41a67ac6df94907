"""The database layer on real SQLite files: what a unit of work may and may not do, the receive path's
Core statements held against the ORM, and the upgrade of a database made by the previous release."""
from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from db import audit
from db.engine import NestedTransactionError, open_database, transaction
from db.instances import NewInstance, NewReceipt, record_instance
from db.receipts import verify_all
from db.schema import AuditEntry, Instance, Job, Receipt, Send, Series, utcnow

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
                       study_instance_uid="1.2.3", modality="CT", patient_id_hash=audit.hash_patient_id("P1", b"k" * 32),
                       path=f"/archive/{uid}.dcm", sha256="ab" * 32, transfer_syntax_uid="1.2.840.10008.1.2.1",
                       calling_ae="TPS", peer_address="127.0.0.1:1234", source="dimse", received_at=utcnow())


def test_the_receive_paths_core_statements_write_what_the_orm_would(tmp_path):
    """`db.instances.record_instance` (Core, fast, no audit row per instance) against the same rows made with
    the ORM objects."""
    fast, orm = open_database(tmp_path / "fast.sqlite"), open_database(tmp_path / "orm.sqlite")
    placed = []
    receipt = NewReceipt("r1", "host:1:2", "TPS", "127.0.0.1:1234", "dimse", utcnow())
    for uid in ("1.2.3.2.1", "1.2.3.2.2"):
        new = dataclasses.replace(_new(uid), receipt="r1")
        first = uid.endswith(".1")
        assert not record_instance(fast, new, lambda: placed.append(uid), receipt if first else None).duplicate
        with transaction(orm) as s:
            if first:
                s.add(Receipt(**dataclasses.asdict(receipt), how="", instance_count=0))
            s.add(Instance(**{k: getattr(new, k) for k in new.__dataclass_fields__}))
            series = s.execute(select(Series).where(Series.series_instance_uid == new.series_instance_uid)).scalar()
            if series is None:
                s.add(Series(series_instance_uid=new.series_instance_uid, study_instance_uid=new.study_instance_uid,
                             modality="CT", calling_ae="TPS", peer_address=new.peer_address, state="receiving",
                             instance_count=1, first_received_at=new.received_at, last_received_at=new.received_at,
                             reason="", patient_id_hash=new.patient_id_hash, completed_by=""))
            else:
                series.instance_count += 1
                series.last_received_at = new.received_at
    assert placed == ["1.2.3.2.1", "1.2.3.2.2"]
    again = record_instance(fast, _new("1.2.3.2.1"), lambda: placed.append("twice"))
    assert again.duplicate and again.existing_sha256 == "ab" * 32 and placed[-1] != "twice"

    def rows(factory):
        with factory() as s:
            inst = [{c.name: getattr(r, c.name) for c in Instance.__table__.columns if c.name not in ("id",)}
                    for r in s.execute(select(Instance).order_by(Instance.id)).scalars()]
            ser = [{c.name: getattr(r, c.name) for c in Series.__table__.columns if c.name not in ("id",)}
                   for r in s.execute(select(Series)).scalars()]
            rec = [{c.name: getattr(r, c.name) for c in Receipt.__table__.columns}
                   for r in s.execute(select(Receipt)).scalars()]
            aud = [(e.event, e.sop_instance_uid) for e in s.execute(select(AuditEntry).order_by(AuditEntry.id)).scalars()]
            return inst, ser, rec, aud

    assert rows(fast) == rows(orm)
    assert rows(fast)[3] == []  # nothing appended to the chain per instance


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
    assert jobs[0].patient_id_hash == audit.legacy_patient_hash("SYN011")  # rows before 0007_web_sessions: unkeyed
    assert [(s.state, s.outcome, s.patient_id_hash) for s in sends] == [("sent", "sent", jobs[0].patient_id_hash)]
    assert problems == [] and count == 20 and events[-1] == "audit.anchored"
    assert audit.head_of(factory).row_id == 20
    with factory() as s:  # its instances, received before receipts, are proven by their own instance.received rows
        _, problems, proof = verify_all(s)
    assert problems == [] and proof.instances > 0 and proof.pending_instances == 0
    with transaction(factory) as s:  # ... so an altered one shows
        uid = s.execute(select(Instance.sop_instance_uid).limit(1)).scalar()
        s.execute(update(Instance).where(Instance.sop_instance_uid == uid).values(sha256="0" * 64))
    with factory() as s:
        _, problems, _ = verify_all(s)
    assert [p.reason for p in problems] == [f"instance {uid} (series {_series_of(factory, uid)}) sha256 {'0' * 64} "
                                            f"differs from its instance.received row's {_old_sha(factory, uid)}"]


def _series_of(factory, uid):
    with factory() as s:
        return s.execute(select(Instance.series_instance_uid).where(Instance.sop_instance_uid == uid)).scalar()


def _old_sha(factory, uid):
    with factory() as s:
        details = s.execute(select(AuditEntry.details).where(AuditEntry.event == "instance.received",
                                                             AuditEntry.sop_instance_uid == uid)).scalar()
    return json.loads(details)["sha256"]


def test_a_receipt_proves_its_instances_and_any_row_added_altered_or_removed_afterwards_shows(factory):
    """Issue 23: one `instances.received` row per series of an association, checked against the instance rows."""
    from db.receipts import close_receipt

    receipt = NewReceipt("r2", "host:1:2", "TPS", "127.0.0.1:1234", "dimse", utcnow())
    for n in range(5):
        record_instance(factory, dataclasses.replace(_new(f"1.2.3.4.{n}"), receipt="r2"), lambda: None,
                        receipt if n == 0 else None)
    with factory() as s:
        _, problems, proof = verify_all(s)
    assert problems == [] and (proof.pending_instances, proof.pending_receipts) == (5, 1)  # open: not yet audited
    with transaction(factory) as s:
        assert close_receipt(s, "r2", "released") == 5
        assert close_receipt(s, "r2", "released") == 0  # once
    with factory() as s:
        _, problems, proof = verify_all(s)
        rows = [json.loads(d) for (d,) in s.execute(select(AuditEntry.details).where(
            AuditEntry.event == "instances.received"))]
    assert problems == [] and proof.pending_instances == 0 and [r["instances"] for r in rows] == [5]

    def tampered(statement) -> list[str]:
        with transaction(factory) as s:
            s.execute(statement)
        with factory() as s:
            return [p.reason for p in verify_all(s)[1]]

    altered = tampered(update(Instance).where(Instance.sop_instance_uid == "1.2.3.4.1").values(sha256="cd" * 32))
    assert len(altered) == 1 and "receipt r2, series 1.2.3.2" in altered[0]
    tampered(update(Instance).where(Instance.sop_instance_uid == "1.2.3.4.1").values(sha256="ab" * 32))
    from sqlalchemy import delete, insert

    assert tampered(delete(Instance).where(Instance.sop_instance_uid == "1.2.3.4.2"))[0].startswith("receipt r2")
    extra = {**dataclasses.asdict(_new("1.2.3.4.9")), "receipt": "forged"}
    assert any("forged" in p for p in tampered(insert(Instance).values(**extra)))


def test_the_self_check_dice_of_an_old_database_is_kept_as_its_file_check_dice(tmp_path):
    """0010 renames jobs.self_check_dice (the written file read back against its masks) to file_check_dice,
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
