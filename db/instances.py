"""Recording a received instance: the one write on the receive path, kept short and fast.

`record_instance` runs in ONE transaction that does NOT take the cluster-wide write lock
(db/engine.py `transaction(lock=False)`): insert the instance row unless its SOP Instance UID is
there (the unique index decides, so two receivers of one UID cannot both store it), put the file in
place (the caller's rename: a file and its row appear together), open or update its series (that
series' row lock is the only one held until commit, so receivers of different series commit in
parallel). No audit row per instance: the instance row names its receipt (db/receipts.py), which
the audit records once when the association ends. Core statements, not the ORM unit of work;
`tests/test_db.py` holds the rows it writes against the same rows made through the ORM.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import Connection, Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from db.engine import transaction
from db.schema import Instance, Receipt, Series


@dataclass(frozen=True)
class NewInstance:
    """The `instances` row of one received instance (UIDs, hashes, where its file is, its receipt)."""

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
    receipt: str = ""


@dataclass(frozen=True)
class NewReceipt:
    """The `receipts` row opened with the first instance an association stores."""

    id: str
    received_by: str
    calling_ae: str
    peer_address: str
    source: str
    opened_at: datetime


@dataclass(frozen=True)
class Recorded:
    """What happened: stored, or an instance of that UID was already there (`existing_*` set)."""

    existing_sha256: str = ""
    existing_path: str = ""
    reopened_from: str = ""  # the series was closed (complete/failed) and this instance reopened it

    @property
    def duplicate(self) -> bool:
        return bool(self.existing_path)


def insert_new(connection: Connection, table: Table, values: dict, key: str) -> bool:
    """INSERT ... ON CONFLICT (key) DO NOTHING on either dialect; True when the row was inserted.

    A conflicting row still being written by another transaction makes this wait for its outcome."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table).values(**values).on_conflict_do_nothing(index_elements=[key]).returning(table.c[key])
    return connection.execute(stmt).first() is not None  # (rowcount says 1 either way through psycopg)


def record_instance(factory: sessionmaker[Session], new: NewInstance, place: Callable[[], None],
                    receipt: NewReceipt | None = None) -> Recorded:
    """Record `new` unless its SOP Instance UID is stored already; `place()` puts its file in place first.

    `receipt`: open this receipt in the same transaction (the association's first stored instance)."""
    with transaction(factory, lock=False) as session:
        connection = session.connection()
        if not insert_new(connection, Instance.__table__, asdict(new), "sop_instance_uid"):
            existing = connection.execute(select(Instance.sha256, Instance.path).where(
                Instance.sop_instance_uid == new.sop_instance_uid)).first()
            return Recorded(existing_sha256=existing[0], existing_path=existing[1])
        place()
        if receipt is not None:
            insert_new(connection, Receipt.__table__, {**asdict(receipt), "how": "", "instance_count": 0}, "id")
        state = _lock_series(connection, new)
        connection.execute(update(Series.__table__).where(
            Series.series_instance_uid == new.series_instance_uid).values(
            instance_count=Series.instance_count + 1, last_received_at=new.received_at, state="receiving",
            **({} if state == "receiving" else {"completed_at": None, "completed_by": ""})))
    return Recorded(reopened_from=state if state != "receiving" else "")


def _lock_series(connection: Connection, new: NewInstance) -> str:
    """The state of `new`'s series, its row locked until commit (created, empty, if it is the first instance).

    The lock is what keeps completion exact without the cluster-wide lock: the completion checker's
    compare-and-set waits for it and then sees the new count (dicom_node/completion.py)."""
    query = select(Series.state).where(Series.series_instance_uid == new.series_instance_uid).with_for_update()
    state = connection.execute(query).scalar()
    if state is None:
        insert_new(connection, Series.__table__, dict(
            series_instance_uid=new.series_instance_uid, study_instance_uid=new.study_instance_uid,
            modality=new.modality, calling_ae=new.calling_ae, peer_address=new.peer_address, state="receiving",
            instance_count=0, first_received_at=new.received_at, last_received_at=new.received_at,
            completed_at=None, reason="", patient_id_hash=new.patient_id_hash, completed_by=""),
            "series_instance_uid")
        state = connection.execute(query).scalar()
    return state
