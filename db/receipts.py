"""Receipts: the audit records what an association stored once, when it ends, not one chained row per image.

Every instance row names the receipt it came in (`instances.receipt`: one per association, drop-in
case or re-ingest; opened with its first stored instance, db/instances.py). When the association
ends, `close_receipt` appends one `instances.received` row per series to the hash chain: how many
instances, and the SHA-256 over their sorted "SOP Instance UID SHA-256" lines (`digest`). So the
write lock is taken once per association, not once per image, and every received instance is still
proven by the chain: `verify` recomputes each digest from the instance rows, and an instance row
added, altered or removed afterwards shows. A receipt left open by a process that died (a crash cuts
the association) is closed at the next start (`recover`, how = "recovered"). Instances received
before receipts existed (migration 0008_receipts) are proven by their own `instance.received` rows.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.audit import ChainProblem, record
from db.engine import transaction
from db.schema import AuditEntry, Instance, Receipt, utcnow

EVENT = "instances.received"
OLD_EVENT = "instance.received"  # one row per instance, before revision 0008_receipts


def new_id() -> str:
    return uuid.uuid4().hex


def digest(rows: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over the sorted "SOP Instance UID SHA-256" lines of (uid, sha256) pairs."""
    h = hashlib.sha256()
    for uid, sha in sorted(rows):
        h.update(f"{uid} {sha}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class _Group:
    study_uid: str
    patient_id_hash: str
    rows: list[tuple[str, str]]


def _groups(session: Session, receipt_id: str) -> dict[str, _Group]:
    """The receipt's instance rows by series."""
    out: dict[str, _Group] = {}
    for series, study, patient, uid, sha in session.execute(select(
            Instance.series_instance_uid, Instance.study_instance_uid, Instance.patient_id_hash,
            Instance.sop_instance_uid, Instance.sha256).where(Instance.receipt == receipt_id)):
        out.setdefault(series, _Group(study, patient, [])).rows.append((uid, sha))
    return out


def close_receipt(session: Session, receipt_id: str, how: str, **details: object) -> int:
    """Inside the caller's (write-locked) transaction: audit what the receipt stored, one row per series,
    and close it. Returns the number of instances; 0 (nothing written) for an unknown or closed receipt."""
    receipt = session.get(Receipt, receipt_id, with_for_update=True)
    if receipt is None or receipt.closed_at is not None:
        return 0
    total = 0
    for series, group in sorted(_groups(session, receipt_id).items()):
        total += len(group.rows)
        record(session, EVENT, component="dicom_node", study_instance_uid=group.study_uid,
               series_instance_uid=series, calling_ae=receipt.calling_ae, patient_id_hash=group.patient_id_hash,
               receipt=receipt_id, instances=len(group.rows), digest=digest(group.rows), how=how,
               received_by=receipt.received_by, peer_address=receipt.peer_address, source=receipt.source, **details)
    session.execute(update(Receipt).where(Receipt.id == receipt_id).values(
        closed_at=utcnow(), how=how, instance_count=total))
    return total


def recover(factory: sessionmaker[Session], process_alive: Callable[[str], bool], by: str) -> list[str]:
    """Close the receipts left open by processes that are gone (a crash cut their association); `by`: who
    records it. A receipt of a process still running (here, or on a host we cannot see) is left alone."""
    with factory() as session:
        open_ = session.execute(select(Receipt.id, Receipt.received_by).where(Receipt.closed_at.is_(None))).all()
    closed = []
    for receipt_id, owner in open_:
        if process_alive(owner):
            continue
        with transaction(factory) as session:
            if close_receipt(session, receipt_id, "recovered", recorded_by=by,
                             reason="the receiving process ended without closing the association (crash or kill): "
                                    "recorded at the next start"):
                closed.append(receipt_id)
    return closed


@dataclass(frozen=True)
class Proof:
    """What `verify` found: problems, and instances whose receipt is still open (not yet audited)."""

    problems: list[ChainProblem]
    instances: int
    pending_instances: int
    pending_receipts: int


def verify(session: Session) -> Proof:
    """Is every instance row proven by the chain: by its receipt's digest, or (older rows) by its own
    `instance.received` row? Rows of a receipt still open (association in progress, or cut by a crash and
    not yet recovered) are counted as pending, not as problems."""
    problems: list[ChainProblem] = []
    audited: dict[tuple[str, str], tuple[int, int, str]] = {}  # (receipt, series) -> (row id, count, digest)
    old: dict[str, str] = {}  # SOP Instance UID -> sha256 of its instance.received row
    for row_id, event, series, uid, details in session.execute(select(
            AuditEntry.id, AuditEntry.event, AuditEntry.series_instance_uid, AuditEntry.sop_instance_uid,
            AuditEntry.details).where(AuditEntry.event.in_((EVENT, OLD_EVENT)))):
        d = json.loads(details or "{}")
        if event == OLD_EVENT:
            old[uid] = str(d.get("sha256", ""))
        else:
            audited[(str(d.get("receipt", "")), series)] = (row_id, int(d.get("instances", -1)), str(d.get("digest")))
    open_receipts = set(session.execute(select(Receipt.id).where(Receipt.closed_at.is_(None))).scalars())
    rows: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    count = pending = 0
    for receipt, series, uid, sha in session.execute(select(
            Instance.receipt, Instance.series_instance_uid, Instance.sop_instance_uid, Instance.sha256)):
        count += 1
        if not receipt:
            if old.get(uid) != sha:
                why = "has no receipt and no instance.received row" if uid not in old else \
                    f"sha256 {sha} differs from its instance.received row's {old[uid]}"
                problems.append(ChainProblem(0, f"instance {uid} (series {series}) {why}"))
        elif receipt in open_receipts:
            pending += 1
        else:
            rows[(receipt, series)].append((uid, sha))
    for key in sorted(set(rows) | set(audited)):
        receipt, series = key
        if key not in audited:
            problems.append(ChainProblem(0, f"{len(rows[key])} instance(s) of series {series} name receipt {receipt}, "
                                            "which no instances.received row records (rows added?)"))
            continue
        row_id, n, expected = audited[key]
        got = rows.get(key, [])
        if len(got) != n or digest(got) != expected:
            problems.append(ChainProblem(row_id, f"receipt {receipt}, series {series}: the instance rows ({len(got)}) "
                                                 f"do not match the {n} the audit recorded (rows added, altered or "
                                                 "removed)"))
    return Proof(problems, count, pending, len(open_receipts))


def verify_all(session: Session) -> tuple[int, list[ChainProblem], Proof]:
    """The chain against its head anchor (db/audit.py `verify`) and every instance row against the chain:
    (chain rows, all problems, the instances' proof)."""
    from db.audit import verify as verify_chain

    rows, problems = verify_chain(session)
    proof = verify(session)
    return rows, problems + proof.problems, proof
