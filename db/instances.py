"""Recording a received instance: the one write on the receive path, kept short and fast.

`record_instance` runs in ONE write transaction: look for the SOP Instance UID, put the file in
place (the caller's rename, done under the lock so a file and its row appear together), insert the
instance row, open or update its series, append `instance.received` to the audit. Core statements,
not the ORM unit of work (about 3 ms per instance less); `tests/test_db_instances.py` holds the
rows it writes against the same rows made through the ORM.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.audit import record
from db.engine import transaction
from db.schema import Instance, Series


@dataclass(frozen=True)
class NewInstance:
    """The `instances` row of one received instance (UIDs, hashes and where its file is)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    patient_id_hash: str
    path: str
    sha256: str
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    source: str
    received_at: datetime


@dataclass(frozen=True)
class Recorded:
    """What happened: stored, or an instance of that UID was already there (`existing_*` set)."""

    existing_sha256: str = ""
    existing_path: str = ""
    reopened_from: str = ""  # the series was closed (complete/failed) and this instance reopened it

    @property
    def duplicate(self) -> bool:
        return bool(self.existing_path)


def record_instance(factory: sessionmaker[Session], new: NewInstance, place: Callable[[], None],
                    component: str = "dicom_node", received_by: str = "") -> Recorded:
    """Record `new` unless its SOP Instance UID is stored already; `place()` puts its file in place first.

    `received_by`: the receiving process (host:pid), in the audit row: several receivers share a port."""
    with transaction(factory) as session:
        connection = session.connection()
        existing = connection.execute(select(Instance.sha256, Instance.path).where(
            Instance.sop_instance_uid == new.sop_instance_uid)).first()
        if existing is not None:
            return Recorded(existing_sha256=existing[0], existing_path=existing[1])
        place()
        connection.execute(insert(Instance.__table__).values(**asdict(new)))
        state = connection.execute(select(Series.state).where(
            Series.series_instance_uid == new.series_instance_uid)).scalar()
        if state is None:
            connection.execute(insert(Series.__table__).values(
                series_instance_uid=new.series_instance_uid, study_instance_uid=new.study_instance_uid,
                modality=new.modality, calling_ae=new.calling_ae, peer_address=new.peer_address, state="receiving",
                instance_count=1, first_received_at=new.received_at, last_received_at=new.received_at,
                completed_at=None, reason="", patient_id_hash=new.patient_id_hash))
        else:
            connection.execute(update(Series.__table__).where(
                Series.series_instance_uid == new.series_instance_uid).values(
                instance_count=Series.instance_count + 1, last_received_at=new.received_at, state="receiving",
                completed_at=None if state != "receiving" else Series.completed_at))
        record(session, "instance.received", component=component, study_instance_uid=new.study_instance_uid,
               series_instance_uid=new.series_instance_uid, sop_instance_uid=new.sop_instance_uid,
               calling_ae=new.calling_ae, patient_id_hash=new.patient_id_hash,
               sop_class_uid=new.sop_class_uid, sha256=new.sha256, peer_address=new.peer_address,
               **({"received_by": received_by} if received_by else {}))
    return Recorded(reopened_from=state if state not in (None, "receiving") else "")
