"""Receiving side of the node: atomic archive write, DB record, quarantine.

One call, `ingest`, takes the bytes a peer sent in a C-STORE and either
  * writes them to archive/<StudyUID>/<SeriesUID>/<SOPUID>.dcm (temp file in the same folder,
    fsync, rename, folder fsync) and records the Instance + Series rows in ONE transaction (without
    the cluster-wide write lock, db/instances.py), and only then reports success (0x0000); the
    audit records the association's instances once, when it ends (`close_receipt`, db/receipts.py), or
  * keeps the raw bytes in quarantine/ with a <name>.reason.json beside them and reports a
    failure status. Nothing a peer sent is dropped without trace.

Duplicate SOP Instance UID: the first copy wins. Same content (sha256 of the encoded data set,
file meta excluded) -> success, no second file, no second row, audit `instance.duplicate`.
Different content -> success (the instance *is* stored), the new bytes go to quarantine with
reason "conflict" and audit `instance.conflict`, so an operator can see both versions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import CTImageStorage, MRImageStorage
from sqlalchemy.orm import Session, sessionmaker

from config.schema import StorageConfig
from converters.files import TEMP_PREFIX, fsync_dir, temp_name, temp_writer, write_atomic
from db.audit import hash_patient_id, record, site_key
from db.engine import ensure_reserve, is_unavailable, restrict, transaction, write_with_reserve
from db.instances import NewInstance, NewReceipt, record_instance
from db.receipts import close_receipt, new_id, recover as recover_open_receipts
from db.schema import utcnow

LOG = logging.getLogger("rtprop.node.storage")

# DIMSE C-STORE statuses (PS3.4 B.2.3, PS3.7 C) that this node returns.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700        # below storage.min_free_mb, the disk refused the write, or the database is down
DATASET_MISMATCH = 0xA900        # required attribute missing/invalid or not matching the command
CANNOT_UNDERSTAND = 0xC000       # the data set cannot be parsed
PROCESSING_FAILURE = 0x0110      # our own fault (database unavailable ...): the peer should retry

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass
class Received:
    """What the network layer knows about one C-STORE besides the bytes."""

    calling_ae: str = ""
    peer_address: str = ""
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    transfer_syntax_uid: str = ""
    source: str = "dimse"
    receipt: str = ""  # the association's receipt (db/receipts.py); '' = a receipt of its own, closed at once


@dataclass
class IngestResult:
    status: int
    reason: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    path: Path | None = None
    duplicate: bool = False
    quarantined: Path | None = None
    extra: dict = field(default_factory=dict)


class IngestError(Exception):
    """A data set the node refuses; carries the DIMSE status and a reason for the quarantine file."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def archive_path(archive: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """archive/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm (UIDs only, no names)."""
    return archive / study_uid / series_uid / f"{sop_uid}.dcm"


def _split_meta(raw: bytes) -> int:
    """Offset where the data set starts after preamble + 'DICM' + group 0002 (0 if none)."""
    if len(raw) >= 144 and raw[128:132] == b"DICM":
        # (0002,0000) FileMetaInformationGroupLength, explicit VR LE: tag(4) VR(2) len(2) value(4)
        if raw[132:136] == b"\x02\x00\x00\x00" and raw[136:138] == b"UL":
            return 144 + int.from_bytes(raw[140:144], "little")
    return 0


@dataclass
class _Parsed:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    patient_id_hash: str
    transfer_syntax_uid: str


IMAGE_CLASSES = {CTImageStorage, MRImageStorage}
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}


def _truncated_elements(ds) -> str:  # type: ignore[no-untyped-def]
    """pydicom silently accepts a value shorter than its declared length: find such elements."""
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        length = getattr(elem, "length", None)
        value = getattr(elem, "value", None)
        if length is None or length == 0xFFFFFFFF or not isinstance(value, (bytes, bytearray)):
            continue
        if len(value) < length:
            return f"element {tag} declares {length} bytes, {len(value)} present"
    return ""


def _check_pixels(ds, transfer_syntax: str) -> None:  # type: ignore[no-untyped-def]
    """A CT/MR image must carry pixel data; uncompressed, of exactly Rows x Columns x ... bytes."""
    if "PixelData" not in ds:
        raise IngestError(DATASET_MISMATCH, "image without Pixel Data (7FE0,0010)")
    if transfer_syntax not in NATIVE_SYNTAXES:
        return
    try:
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
                    * int(ds.BitsAllocated) // 8 * int(ds.get("NumberOfFrames", 1) or 1))
        actual = ds.get_item("PixelData").length if hasattr(ds.get_item("PixelData"), "length") else len(ds.PixelData)
    except Exception as exc:
        raise IngestError(DATASET_MISMATCH, f"image pixel description unusable: {type(exc).__name__}: {exc}") from exc
    if actual not in (expected, expected + 1):  # +1: odd lengths are padded to even
        raise IngestError(DATASET_MISMATCH, f"Pixel Data holds {actual} bytes, Rows/Columns/Bits say {expected}")


def parse_identifiers(raw: bytes, received: Received, patient_key: bytes) -> _Parsed:
    """Read the identifying attributes (the Patient ID as its keyed pseudonym, db/audit.py); IngestError(0xC000 /
    0xA900) when they are unusable."""
    try:
        ds = dcmread(BytesIO(raw), force=True)  # values stay raw bytes: cheap even for 0.5 MB
        truncated = _truncated_elements(ds)
        values = {k: ds.get(k) for k in REQUIRED}
        modality = str(ds.get("Modality", "") or "")
        patient_id = str(ds.get("PatientID", "") or "")
        tsyntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else ""
    except Exception as exc:  # pydicom raises many types on garbage: all mean "cannot understand"
        raise IngestError(CANNOT_UNDERSTAND, f"data set cannot be parsed: {type(exc).__name__}: {exc}") from exc
    if truncated:
        raise IngestError(CANNOT_UNDERSTAND, f"data set truncated: {truncated}")
    missing = [k for k, v in values.items() if v is None or str(v).strip() == ""]
    if missing:
        raise IngestError(DATASET_MISMATCH, f"required attribute(s) missing or empty: {', '.join(missing)}")
    clean = {k: str(v).strip().rstrip("\x00") for k, v in values.items()}
    bad = [f"{k}={v!r}" for k, v in clean.items() if len(v) > 64 or not UID_RE.match(v)]
    if bad:
        raise IngestError(DATASET_MISMATCH, f"invalid UID value(s): {', '.join(bad)}")
    if received.affected_sop_instance_uid and clean["SOPInstanceUID"] != received.affected_sop_instance_uid:
        raise IngestError(DATASET_MISMATCH, "SOPInstanceUID in the data set "
                          f"{clean['SOPInstanceUID']} != Affected SOP Instance UID {received.affected_sop_instance_uid}")
    if received.affected_sop_class_uid and clean["SOPClassUID"] != received.affected_sop_class_uid:
        raise IngestError(DATASET_MISMATCH, "SOPClassUID in the data set "
                          f"{clean['SOPClassUID']} != Affected SOP Class UID {received.affected_sop_class_uid}")
    if clean["SOPClassUID"] in IMAGE_CLASSES:
        _check_pixels(ds, received.transfer_syntax_uid or tsyntax)
    return _Parsed(clean["SOPClassUID"], clean["SOPInstanceUID"], clean["StudyInstanceUID"],
                   clean["SeriesInstanceUID"], modality[:16], hash_patient_id(patient_id, patient_key),
                   received.transfer_syntax_uid or tsyntax)


class Store:
    """The archive + quarantine + DB writer shared by all associations of one node."""

    def __init__(self, storage: StorageConfig, factory: sessionmaker[Session], *, fsync: bool = True,
                 on_duplicate: Callable[[str, str, str], Any] | None = None) -> None:
        self.storage = storage
        self.factory = factory
        self.fsync = fsync
        # (SOP Class UID, SOP Instance UID, calling AE) of an identical instance received again, after its audit
        # row: the node answers a prompt sent again (pipeline/delivery.py `prompt_received_again`)
        self.on_duplicate = on_duplicate
        self.archive = Path(storage.archive)
        self.quarantine_dir = Path(storage.quarantine)
        self.min_free_bytes = int(storage.min_free_mb) * 1024 * 1024
        for folder in (self.archive, self.quarantine_dir):  # patient data: the node's user only
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            restrict(folder, 0o700)
        self._known_dirs: set[Path] = set()
        self._opened: set[str] = set()  # receipts this process opened and has not closed
        self._unclosed: list[tuple[str, str]] = []  # (receipt, how) whose close failed: tried again with the next
        self._lock = threading.Lock()
        from dicom_node.scu import worker_id

        self.me = worker_id()  # host:pid:start, on each receipt (several receivers; recovery after a crash)

    # ------------------------------------------------------------------ space
    def has_space(self, needed: int) -> bool:
        free = shutil.disk_usage(self.archive).free
        return free - needed >= self.min_free_bytes

    # ------------------------------------------------------------- quarantine
    def quarantine(self, raw: bytes, received: Received, status: int, reason: str,
                   *, audit: bool = True, **ids: str) -> Path | None:
        """Keep `raw` with a reason file; audit `instance.quarantined`. Never raises."""
        stamp = utcnow().strftime("%Y%m%dT%H%M%S.%fZ")
        day = self.quarantine_dir / stamp[:8]
        name = f"{stamp}-{uuid.uuid4().hex[:12]}"
        path = day / f"{name}.dcm"
        info = {
            "reason": reason, "status": f"0x{status:04X}", "received_at": stamp,
            "calling_ae": received.calling_ae, "peer_address": received.peer_address,
            "affected_sop_class_uid": received.affected_sop_class_uid,
            "affected_sop_instance_uid": received.affected_sop_instance_uid,
            "transfer_syntax_uid": received.transfer_syntax_uid, "bytes": len(raw), **ids,
        }
        try:
            if self.has_space(len(raw)):
                write_atomic(path, raw, fsync=self.fsync)
            else:
                info["bytes_kept"] = False  # no room for the bytes; the reason file still says what came
                path = None  # type: ignore[assignment]
            write_atomic(day / f"{name}.reason.json", json.dumps(info, indent=1).encode(), fsync=self.fsync)
        except OSError as exc:
            LOG.error("quarantine write failed (%s): %s", reason, exc)
            path = None  # type: ignore[assignment]
        if audit:
            try:
                write_with_reserve(self.factory, lambda session: record(
                    session, "instance.quarantined", component="dicom_node",
                    sop_instance_uid=ids.get("sop_instance_uid", received.affected_sop_instance_uid),
                    series_instance_uid=ids.get("series_instance_uid", ""),
                    study_instance_uid=ids.get("study_instance_uid", ""), calling_ae=received.calling_ae,
                    status=f"0x{status:04X}", reason=reason, quarantine_path=str(path) if path else "",
                    peer_address=received.peer_address))
            except Exception as exc:  # the reason file is the record of last resort
                LOG.error("audit of quarantined instance %s failed: %s", received.affected_sop_instance_uid, exc)
        LOG.warning("quarantined %s from %s: 0x%04X %s", received.affected_sop_instance_uid,
                    received.calling_ae, status, reason)
        return path

    # ----------------------------------------------------------------- ingest
    def ingest(self, raw: bytes, received: Received) -> IngestResult:
        """Archive + record one instance; return the status to send back. Never raises.

        Without `received.receipt` the instance gets a receipt of its own, audited at once."""
        if not received.receipt:
            received = dataclasses.replace(received, receipt=new_id())
            try:
                return self._ingest_safely(raw, received)
            finally:
                self.close_receipt(received.receipt, "done")
        return self._ingest_safely(raw, received)

    def close_receipt(self, receipt: str, how: str, audit: Callable[[Session], object] | None = None) -> int:
        """Audit what `receipt` stored and close it, with `audit(session)`'s rows in the same transaction;
        returns the number of instances. Never raises: a receipt whose close failed (database away) is
        closed with the next one, or at the next start."""
        opened = receipt in self._opened
        self._opened.discard(receipt)
        if not opened and audit is None:
            return 0
        with self._lock:
            retry, self._unclosed = self._unclosed, []
        try:
            with transaction(self.factory) as session:
                for earlier, earlier_how in retry:
                    close_receipt(session, earlier, earlier_how)
                count = close_receipt(session, receipt, how) if opened else 0
                if audit is not None:
                    audit(session)
                return count
        except Exception:  # noqa: BLE001 - the instance rows are there; the receipt is recorded later
            LOG.exception("closing receipt %s failed; it is recorded with the next one", receipt)
            with self._lock:
                self._unclosed += retry + ([(receipt, how)] if opened else [])
            return 0

    def recover_receipts(self) -> list[str]:
        """At start-up: audit the receipts of associations a crash cut (their process is gone)."""
        from dicom_node.scu import owner_alive

        closed = recover_open_receipts(self.factory, owner_alive, self.me)
        if closed:
            LOG.warning("recorded %d receipt(s) left open by a process that ended: %s", len(closed), closed)
        return closed

    def _ingest_safely(self, raw: bytes, received: Received) -> IngestResult:
        try:
            return self._ingest(raw, received)
        except IngestError as exc:
            q = self.quarantine(raw, received, exc.status, exc.reason)
            return IngestResult(exc.status, exc.reason, sop_instance_uid=received.affected_sop_instance_uid,
                                quarantined=q)
        except OSError as exc:
            status = OUT_OF_RESOURCES if exc.errno in (28, 122) else PROCESSING_FAILURE  # ENOSPC, EDQUOT
            LOG.error("archive write failed for %s: %s", received.affected_sop_instance_uid, exc)
            return IngestResult(status, f"archive write failed: {exc}",
                                sop_instance_uid=received.affected_sop_instance_uid)
        except Exception as exc:
            if is_unavailable(exc):  # nothing was acknowledged: the peer keeps it and sends it again later
                LOG.error("database unavailable: refusing %s (0xA700): %s", received.affected_sop_instance_uid,
                          str(exc).splitlines()[0][:300])
                return IngestResult(OUT_OF_RESOURCES, "database unavailable, try again later",
                                    sop_instance_uid=received.affected_sop_instance_uid)
            LOG.exception("ingest failed for %s", received.affected_sop_instance_uid)
            return IngestResult(PROCESSING_FAILURE, f"internal error: {type(exc).__name__}: {exc}",
                                sop_instance_uid=received.affected_sop_instance_uid)

    def _ingest(self, raw: bytes, received: Received) -> IngestResult:
        if not self.has_space(len(raw)):
            reason = f"free space below storage.min_free_mb={self.storage.min_free_mb}"
            LOG.error("refusing %s: %s", received.affected_sop_instance_uid, reason)
            self._audit_refusal(received, OUT_OF_RESOURCES, reason)
            return IngestResult(OUT_OF_RESOURCES, reason, sop_instance_uid=received.affected_sop_instance_uid)
        ensure_reserve(self.factory)  # one stat when it is there; rebuilt once the disk has room again
        p = parse_identifiers(raw, received, site_key(self.factory))
        start = _split_meta(raw)
        digest = hashlib.sha256(memoryview(raw)[start:]).hexdigest()
        final = archive_path(self.archive, p.study_instance_uid, p.series_instance_uid, p.sop_instance_uid)
        folder = final.parent
        if folder not in self._known_dirs:
            folder.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                fsync_dir(folder.parent)
                fsync_dir(folder.parent.parent)
            self._known_dirs.add(folder)
        # 1. bytes on disk under a temp name (outside the DB lock: associations write in parallel)
        tmp = folder / temp_name()

        def place() -> None:  # under the DB lock: the file appears with its row
            os.replace(tmp, final)
            if self.fsync:
                fsync_dir(folder)

        try:
            with open(tmp, "wb") as fh:
                fh.write(raw)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            # 2. one transaction (no cluster-wide lock): duplicate check, rename, rows; commit = success
            now = utcnow()
            first = received.receipt not in self._opened
            done = record_instance(self.factory, NewInstance(
                sop_instance_uid=p.sop_instance_uid, sop_class_uid=p.sop_class_uid,
                series_instance_uid=p.series_instance_uid, study_instance_uid=p.study_instance_uid,
                modality=p.modality, patient_id_hash=p.patient_id_hash, path=str(final), sha256=digest,
                transfer_syntax_uid=p.transfer_syntax_uid, calling_ae=received.calling_ae[:16],
                peer_address=received.peer_address[:64], source=received.source, received_at=now,
                receipt=received.receipt), place,
                NewReceipt(received.receipt, self.me, received.calling_ae[:16], received.peer_address[:64],
                           received.source, now) if first else None)
            if not done.duplicate:
                self._opened.add(received.receipt)
        finally:
            if tmp.exists():
                tmp.unlink(missing_ok=True)
        if done.duplicate:
            return self._duplicate_tx(raw, received, p, digest, done.existing_sha256, done.existing_path)
        if done.reopened_from:
            with transaction(self.factory) as session:
                record(session, "series.reopened", component="dicom_node", study_instance_uid=p.study_instance_uid,
                       series_instance_uid=p.series_instance_uid, calling_ae=received.calling_ae,
                       patient_id_hash=p.patient_id_hash, previous_state=done.reopened_from,
                       reason="instance arrived after the series was closed")
        return IngestResult(SUCCESS, sop_instance_uid=p.sop_instance_uid, series_instance_uid=p.series_instance_uid,
                            study_instance_uid=p.study_instance_uid, path=final)

    def _audit_refusal(self, received: Received, status: int, reason: str) -> None:
        """`instance.refused`, even on a full disk (the database reserve is given back for it)."""
        try:
            write_with_reserve(self.factory, lambda session: record(
                session, "instance.refused", component="dicom_node", sop_instance_uid=received.affected_sop_instance_uid,
                calling_ae=received.calling_ae, status=f"0x{status:04X}", reason=reason,
                peer_address=received.peer_address))
        except Exception as exc:  # noqa: BLE001 - the peer still gets its failure status
            LOG.error("audit of refused instance %s failed: %s", received.affected_sop_instance_uid, exc)

    def _duplicate_tx(self, raw: bytes, received: Received, p: _Parsed, digest: str, kept_sha: str,
                      kept_path: str) -> IngestResult:
        with transaction(self.factory) as session:
            result = self._duplicate(session, raw, received, p, digest, kept_sha, kept_path)
        if self.on_duplicate is not None and result.quarantined is None:
            try:
                self.on_duplicate(p.sop_class_uid, p.sop_instance_uid, received.calling_ae)
            except Exception:  # noqa: BLE001 - the instance is stored: the peer gets its success status
                LOG.exception("handling instance %s received again failed", p.sop_instance_uid)
        return result

    def _duplicate(self, session: Session, raw: bytes, received: Received, p: _Parsed, digest: str,
                   kept_sha: str, kept_path: str) -> IngestResult:
        ids = dict(sop_instance_uid=p.sop_instance_uid, series_instance_uid=p.series_instance_uid,
                   study_instance_uid=p.study_instance_uid)
        if kept_sha == digest:
            record(session, "instance.duplicate", component="dicom_node", calling_ae=received.calling_ae,
                   patient_id_hash=p.patient_id_hash, sha256=digest, identical=True, **ids)
            return IngestResult(SUCCESS, "duplicate (identical)", path=Path(kept_path), duplicate=True, **ids)
        reason = (f"conflict: SOP Instance UID already stored with different content "
                  f"(kept first sha256={kept_sha}, this sha256={digest})")
        q = self.quarantine(raw, received, SUCCESS, reason, audit=False, **ids)
        record(session, "instance.conflict", component="dicom_node", calling_ae=received.calling_ae,
               patient_id_hash=p.patient_id_hash, kept_sha256=kept_sha, new_sha256=digest,
               quarantine_path=str(q) if q else "", **ids)
        return IngestResult(SUCCESS, reason, path=Path(kept_path), duplicate=True, quarantined=q, **ids)


OTHER_HOST_TEMP_AGE_S = 3600  # a temporary of another host's process is left alone this long


def _writer_gone(tmp: Path) -> bool:
    """Was `tmp` left by a process that is no longer writing it? Never one still running: several
    receivers and workers may share the storage (docs/scaling.md)."""
    writer = temp_writer(tmp.name)
    if writer is None:
        return True  # no writer named (an older release): as before, left by a killed process
    host, pid = writer
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False  # running (perhaps this very process, whose workers may already be writing)
    try:
        return time.time() - tmp.stat().st_mtime > OTHER_HOST_TEMP_AGE_S
    except OSError:
        return False


def recover(storage: StorageConfig) -> int:
    """At start-up: delete temp files killed processes left behind (never complete instances, never the
    temporaries of a process still running, here or on another host sharing the storage)."""
    removed = 0
    for root in (Path(storage.archive), Path(storage.quarantine), Path(storage.outbox)):
        if not root.is_dir():
            continue
        for tmp in root.rglob(f"{TEMP_PREFIX}*"):
            if not _writer_gone(tmp):
                continue
            try:
                tmp.unlink()
                removed += 1
            except OSError as exc:
                LOG.warning("could not remove temp file %s: %s", tmp, exc)
    return removed
