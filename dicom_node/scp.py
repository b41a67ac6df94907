"""The listening AE: Verification + Storage SCP with handlers that do one thing quickly.

C-STORE handler: bytes as sent (`event.encoded_dataset()`, no decode) -> Store.ingest (atomic
archive write + one DB transaction) -> status. Slow work (completion, jobs, sending) runs elsewhere
and reads the DB.
"""
from __future__ import annotations

import logging
import socket
import sys
import threading
from typing import Any, Callable

from pydicom import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config as pynetdicom_config, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    RTStructureSetStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from config.schema import Config
from db.audit import record
from db.engine import transaction
from db.receipts import new_id
from dicom_node.gate import Gate, GatedRequestHandler, GateLimits, Refused, printable
from dicom_node.storage import Received, Store
from dicom_node.tls import server_context

LOG = logging.getLogger("rtprop.node.scp")

STORAGE_CLASSES = (CTImageStorage, MRImageStorage, RTStructureSetStorage)
NETWORK_TIMEOUT_S = 60.0  # idle association; also the longest silence in the middle of a PDU (dicom_node/gate.py)
# Enhanced MR Image Storage (1.2.840.10008.5.1.4.1.1.4.1) is NOT accepted: the converters read
# single-frame images only, so an Enhanced MR would be stored and then fail in the pipeline.

UNCOMPRESSED = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
COMPRESSED_CANDIDATES = [JPEGLosslessSV1, JPEGLossless, JPEG2000Lossless, JPEG2000, RLELossless,
                         JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSLossless, JPEGLSNearLossless]


def decodable_transfer_syntaxes() -> list[UID]:
    """Transfer syntaxes whose pixel data this installation can decode (checked at start-up)."""
    out = list(UNCOMPRESSED)
    for uid in COMPRESSED_CANDIDATES:
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except Exception:  # no decoder known for this UID at all
            pass
    return out


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY: without it every small PDU (C-STORE-RSP) waits on Nagle/delayed-ACK (~40 ms)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # e.g. a non-TCP socket in tests
        LOG.debug("TCP_NODELAY not set: %s", exc)


class _AssociationSeries:
    """Per association: its receipt (db/receipts.py) and the series and instances it stored, so that its end
    records them in the audit once and hints the completion checker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_assoc: dict[int, tuple[str, set[str], list[int]]] = {}

    def receipt(self, assoc_id: int) -> str:
        with self._lock:
            return self._by_assoc.setdefault(assoc_id, (new_id(), set(), [0]))[0]

    def add(self, assoc_id: int, series_uid: str) -> None:
        with self._lock:
            _, series, count = self._by_assoc.setdefault(assoc_id, (new_id(), set(), [0]))
            series.add(series_uid)
            count[0] += 1

    def pop(self, assoc_id: int) -> tuple[str, set[str], int]:
        with self._lock:
            receipt, series, count = self._by_assoc.pop(assoc_id, ("", set(), [0]))
            return receipt, series, count[0]


def _error_comment(reason: str) -> str:
    """Error Comment (0000,0902) is LO: 64 characters, no backslash or control characters."""
    clean = "".join(c if c.isprintable() and c != "\\" else " " for c in reason)
    return clean[:64]


def _calling_ae(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _peer(event: evt.Event) -> str:
    info = event.assoc.requestor
    return f"{info.address}:{info.port}"


# A-ASSOCIATE-RJ (source, reason) -> the refusal's key in the node's counts (PS3.8 table 9-21)
REJECT_REASONS = {(3, 2): "local_limit", (3, 1): "congestion", (1, 3): "calling_ae_not_allowed",
                  (1, 7): "called_ae_not_recognised", (2, 2): "protocol_version", (1, 2): "application_context"}


def build_handlers(config: Config, store: Store, gate: Gate,
                   on_release: Callable[[set[str]], None] | None = None) -> list[tuple]:
    """Event handlers for the server: connection tuning, C-STORE, release hint, rejection and abort audit.
    `on_release` gets the series an association stored when it is released (the completion checker then looks
    at once, and completes them when node.complete_on_release is set: dicom_node/service.py)."""
    seen = _AssociationSeries()

    def handle_open(event: evt.Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            tune_socket(sock)

    def handle_store(event: evt.Event) -> int | tuple:
        req = event.request
        try:
            raw = event.encoded_dataset()
        except Exception as exc:  # nothing to keep: answer and go on
            LOG.error("C-STORE without a usable data set: %s", printable(exc, 200))
            return 0xC000
        received = Received(
            calling_ae=_calling_ae(event), peer_address=_peer(event),
            affected_sop_class_uid=str(req.AffectedSOPClassUID or ""),
            affected_sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
            transfer_syntax_uid=str(event.context.transfer_syntax), receipt=seen.receipt(id(event.assoc)),
        )
        result = store.ingest(raw, received)
        if result.status == 0x0000 and result.series_instance_uid:
            seen.add(id(event.assoc), result.series_instance_uid)
        if result.status != 0x0000:
            rsp = Dataset()
            rsp.Status = result.status
            rsp.ErrorComment = _error_comment(result.reason)
            return rsp
        return 0x0000

    def audit_end(event: evt.Event, how: str, **more: Any) -> set[str]:
        """One write for the association's end: its receipt (what it stored, per series) and `association.<how>`."""
        receipt, series, stored = seen.pop(id(event.assoc))
        store.close_receipt(receipt, how, audit=lambda session: record(
            session, f"association.{how}", component="dicom_node", calling_ae=_calling_ae(event),
            peer_address=_peer(event), instances_stored=stored, series=sorted(series)[:20], receipt=receipt, **more))
        return series

    def handle_released(event: evt.Event) -> None:
        series = audit_end(event, "released")
        if series and on_release is not None:
            on_release(series)

    def handle_aborted(event: evt.Event) -> None:
        refusal = getattr(event.assoc.dul.socket, "refusal", None)  # set by GatedSocket when it cut the PDU
        # an aborted transfer may be incomplete: the quiet period decides
        audit_end(event, "aborted", **({"reason": refusal.reason} if refusal else {}))

    def handle_acse_sent(event: evt.Event) -> None:
        primitive = event.primitive
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (1, 2):  # our A-ASSOCIATE-RJ: why, for below
            event.assoc.rtprop_reject = (primitive.result_source, primitive.diagnostic)

    def handle_rejected(event: evt.Event) -> None:
        source, diagnostic = getattr(event.assoc, "rtprop_reject", (0, 0))
        reason = REJECT_REASONS.get((source, diagnostic), f"rejected_{source}_{diagnostic}")
        gate.record(_peer(event), Refused(reason, f"association from calling AE {_calling_ae(event)} "
                                          f"rejected ({reason})", audit_event="association.rejected",
                                          calling_ae=_calling_ae(event),
                                          called_ae=str(event.assoc.acceptor.ae_title).strip()))

    return [
        (evt.EVT_CONN_OPEN, handle_open),
        (evt.EVT_C_STORE, handle_store),
        (evt.EVT_RELEASED, handle_released),
        (evt.EVT_ABORTED, handle_aborted),
        (evt.EVT_ACSE_SENT, handle_acse_sent),
        (evt.EVT_REJECTED, handle_rejected),
    ]


def build_ae(config: Config) -> AE:
    """The acceptor AE with contexts, limits and the calling-AE allow-list from `config.node`."""
    node = config.node
    # pynetdicom's "standard" handlers log every PDU and DIMSE message: real cost per instance, and
    # the identifiers they print are not ours to control. Our handlers log UIDs + AE titles only.
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_bytes  # what a peer may send per P-DATA-TF; more aborts (dicom_node/gate.py)
    ae.require_called_aet = False
    if node.allowed_calling_aes:
        # refused by the gate already (dicom_node/gate.py); kept as pynetdicom's own second check
        ae.require_calling_aet = list(node.allowed_calling_aes)
    ae.network_timeout = NETWORK_TIMEOUT_S
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    for sop in STORAGE_CLASSES:
        ae.add_supported_context(sop, syntaxes)
    return ae


def gate_limits(config: Config) -> GateLimits:
    node = config.node
    return GateLimits(request_timeout_s=node.association_request_timeout_s,
                      max_pending_per_address=node.max_pending_per_address,
                      max_request_bytes=node.max_association_request_bytes, max_pdu_bytes=node.max_pdu_bytes,
                      network_timeout_s=NETWORK_TIMEOUT_S,
                      allowed_calling_aes=frozenset(a.strip() for a in node.allowed_calling_aes))


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server behind the gate (dicom_node/gate.py).

    Each connection's own thread does the TLS handshake (pynetdicom would do it inside `accept`, with
    no timeout, so one silent client stopped every other) and reads the A-ASSOCIATE-RQ under the
    gate's limits; only an admitted connection becomes a pynetdicom association.
    """

    gate: Gate
    reuse_port: bool = False  # SO_REUSEPORT: several `rtprop serve` processes share one port (node.reuse_port)

    def server_bind(self) -> None:
        if self.reuse_port:  # set before bind; the kernel spreads new connections over the processes
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # type: ignore[union-attr]
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()  # type: ignore[union-attr]
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            first_pdu = self.gate.admit(request, client_address)  # None: refused, answered and closed
            if first_pdu is not None:
                GatedRequestHandler(request, client_address, self, first_pdu)
        except Exception:  # noqa: BLE001
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """One log line, not socketserver's traceback on stderr."""
        exc = sys.exc_info()[1]
        LOG.error("connection from %s failed: %s", client_address[0], printable(f"{type(exc).__name__}: {exc}", 240))


class SharedPortServer(AssociationServer):
    """The same server on a port shared with other `rtprop serve` processes (SO_REUSEPORT, Linux)."""

    reuse_port = True


def audit_refusals(factory) -> Callable[[Refused, str, int], None]:  # type: ignore[no-untyped-def]
    """The gate's audit hook: a failed TLS handshake and a rejected association get a row each (as they
    always had); other refusals one `association.refused` row per address and reason a minute, with
    the count since the last (a flood of connections must not become a flood of writes)."""
    def on_refused(refusal: Refused, peer: str, due: int) -> None:
        if not refusal.audit_event and not due:
            return
        with transaction(factory) as session:
            if refusal.audit_event == "association.tls_failed":
                record(session, refusal.audit_event, component="dicom_node", peer_address=peer, reason=refusal.detail)
            elif refusal.audit_event:
                record(session, refusal.audit_event, component="dicom_node", calling_ae=refusal.calling_ae[:16],
                       peer_address=peer, called_ae=refusal.called_ae, reason=refusal.reason)
            else:
                record(session, "association.refused", component="dicom_node", peer_address=peer,
                       reason=refusal.reason, detail=refusal.detail, refusals=due)
    return on_refused


def start_scp(config: Config, store: Store,
              on_release: Callable[[set[str]], None] | None = None) -> tuple[AE, ThreadedAssociationServer]:
    """Start listening on config.node.host:port (non-blocking); returns (ae, server); `server.gate` counts refusals."""
    ae = build_ae(config)
    gate = Gate(gate_limits(config), audit_refusals(store.factory))
    handlers = build_handlers(config, store, gate, on_release)
    ssl_ctx = server_context(config.node.tls)
    server = ae.make_server((config.node.host, config.node.port), evt_handlers=handlers, ssl_context=ssl_ctx,
                            server_class=SharedPortServer if config.node.reuse_port else AssociationServer)
    server.gate = gate  # type: ignore[attr-defined]
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() and ae.shutdown() expect it
    server.accept_thread = threading.Thread(target=server.serve_forever, name="rtprop-scp-accept",  # type: ignore[attr-defined]
                                            daemon=True)
    server.accept_thread.start()  # type: ignore[attr-defined]
    # Accepted sockets inherit TCP_NODELAY from the listening socket on Linux; the CONN_OPEN handler
    # sets it again per connection for other platforms.
    tune_socket(server.socket)
    LOG.info("listening as %s on %s:%s (TLS %s), %d transfer syntaxes", config.node.ae_title, config.node.host,
             server.server_address[1], "on" if ssl_ctx else "off", len(decodable_transfer_syntaxes()))
    return ae, server
