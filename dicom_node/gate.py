"""The door of the SCP: what a new connection must do before pynetdicom gives it an association.

PS3.8 bounds the wait for an A-ASSOCIATE-RQ with the ARTIM timer, but pynetdicom 3.0.4 reads every
PDU with a blocking `recv` of its declared length inside the association's DUL thread
(`dul.py`, `_read_pdu_data`): a peer that sends 6 header bytes and then one byte every few seconds
is never timed out, each such connection is an acceptor thread counted against
`node.max_associations` before anyone has said who they are, and a header declaring 200 MiB is
read into memory before anything looks at it. So the server reads the A-ASSOCIATE-RQ itself, in
the connection's own thread, before an Association exists (`Gate.admit`):

1. at most `node.max_pending_per_address` connections of one peer address may still be sending
   their request; beyond that a connection is closed at once;
2. the whole A-ASSOCIATE-RQ (TLS handshake included) must arrive within
   `node.association_request_timeout_s` of the accept, however its bytes are paced (ARTIM);
3. its header must say A-ASSOCIATE-RQ and declare at most `node.max_association_request_bytes`;
4. it must decode, and its calling AE title must be allowed (A-ASSOCIATE-RJ otherwise, the answer
   pynetdicom would give, without an association thread waiting on the peer to hang up).

Only then does pynetdicom see the connection, its request already read (`GatedSocket` hands it to
the DUL), so accepted associations and unfinished connections are counted apart. After that a PDU
whose header declares more than the Maximum Length we negotiated (`node.max_pdu_bytes`) aborts the
association at its header, and a peer silent for the network timeout in the middle of a PDU loses
the association instead of holding it.

Every refusal is one log line (reason, peer; AE titles escaped) and is counted (`Refusals`), which
the node's heartbeat carries to /health and /metrics.
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler

LOG = logging.getLogger("rtprop.node.gate")
HEADER = 6  # PDU type (1), reserved (1), length (4, big endian): PS3.8 9.3
PDU_TYPES = range(0x01, 0x08)
# A-ABORT sources and reasons (PS3.8 table 9-26): 2 = service-provider; 2 unexpected PDU, 6 invalid parameter value
ABORT_UNEXPECTED_PDU, ABORT_INVALID_VALUE = (2, 2), (2, 6)
# A-ASSOCIATE-RJ (PS3.8 table 9-21): rejected-permanent, service-user, calling AE title not recognised
REJECT_CALLING_AE = (1, 1, 3)
LINGER_S = 1.0  # after a refusal with an answer: how long the peer has to read it and hang up ...
LINGER_BYTES = 65536  # ... and how much more it may send meanwhile (read and dropped) before we reset it


def printable(text: Any, limit: int = 80) -> str:
    """`text` for one log line: control characters and backslashes escaped, at most `limit` characters."""
    out = str(text).encode("unicode_escape", "backslashreplace").decode("ascii")
    return out if len(out) <= limit else out[:limit] + "..."


@dataclass(frozen=True)
class GateLimits:
    """The numbers of the module docstring, from `config.node`."""

    request_timeout_s: float
    max_pending_per_address: int
    max_request_bytes: int
    max_pdu_bytes: int
    network_timeout_s: float  # once associated: the longest silence in the middle of a PDU
    allowed_calling_aes: frozenset[str]  # empty: any


class Refused(Exception):
    """A refused connection or association: `reason` is a short key (metrics), `detail` a sentence for the log,
    `answer` the PDU the peer gets before the close; `audit_event` names the audit row each one gets (empty:
    `association.refused`, one row per address and reason a minute)."""

    def __init__(self, reason: str, detail: str, *, answer: bytes = b"", counted: bool = True,
                 audit_event: str = "", calling_ae: str = "", called_ae: str = "") -> None:
        super().__init__(detail)
        self.reason, self.detail, self.answer, self.counted = reason, detail, answer, counted
        self.audit_event, self.calling_ae, self.called_ae = audit_event, calling_ae, called_ae


class Refusals:
    """Refused connections and associations of this process, by reason: totals and the recent ones."""

    def __init__(self, keep: int = 10000) -> None:
        self._lock = threading.Lock()
        self._total: Counter[str] = Counter()
        self._recent: deque[tuple[float, str, str]] = deque(maxlen=keep)  # (monotonic time, reason, address)
        self._audited: dict[tuple[str, str], tuple[float, int]] = {}  # (address, reason) -> (last row, since)

    def add(self, reason: str, address: str, audit_every_s: float = 60.0) -> int:
        """Count one refusal; returns how many refusals of this address and reason an audit row should now
        record (0: not yet): the first at once, then one row a minute while they go on."""
        now = time.monotonic()
        with self._lock:
            self._total[reason] += 1
            self._recent.append((now, reason, address))
            last, since = self._audited.get((address, reason), (-audit_every_s, 0))
            if now - last >= audit_every_s:
                if len(self._audited) > 10000:  # many addresses over time: forget the quiet ones
                    self._audited = {k: v for k, v in self._audited.items() if now - v[0] < audit_every_s}
                self._audited[(address, reason)] = (now, 0)
                return since + 1
            self._audited[(address, reason)] = (last, since + 1)
            return 0

    def snapshot(self, window_s: float) -> dict[str, Any]:
        """{"total": {reason: n}, "recent": {reason: n}, "recent_addresses": {address: n} (top 5), "window_s"}."""
        since = time.monotonic() - window_s
        with self._lock:
            recent = [(r, a) for t, r, a in self._recent if t >= since]
            total = dict(self._total)
        addresses = Counter(a for _, a in recent).most_common(5)
        return {"total": total, "recent": dict(Counter(r for r, _ in recent)), "recent_addresses": dict(addresses),
                "window_s": window_s}


class Gate:
    """The per-address count of unfinished connections, the request checks, and the refusal record."""

    def __init__(self, limits: GateLimits, on_refused: Callable[[Refused, str, int], None] | None = None) -> None:
        self.limits = limits
        self.refusals = Refusals()
        self.on_refused = on_refused or (lambda refusal, peer, count: None)  # audit hook: (refusal, peer, rows due)
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    @contextmanager
    def _unfinished(self, address: str) -> Iterator[None]:
        with self._lock:
            if self._pending[address] >= self.limits.max_pending_per_address:
                raise Refused("pending_limit", f"{self._pending[address]} connections from this address are "
                              "still sending their A-ASSOCIATE-RQ (node.max_pending_per_address)")
            self._pending[address] += 1
        try:
            yield
        finally:
            with self._lock:
                self._pending[address] -= 1
                if not self._pending[address]:
                    del self._pending[address]

    def admit(self, sock: socket.socket, address: tuple) -> bytes | None:
        """The A-ASSOCIATE-RQ of a new connection, read and checked (the module docstring's steps 1-4); None
        when refused, the refusal answered, logged, counted and the socket closed."""
        peer = f"{address[0]}:{address[1]}"
        try:
            with self._unfinished(str(address[0])):
                deadline = time.monotonic() + self.limits.request_timeout_s
                if isinstance(sock, ssl.SSLSocket):
                    _handshake(sock, deadline)
                request = read_request(sock, deadline, self.limits.max_request_bytes)
            self._check(request)
        except Refused as refusal:
            self.refuse(sock, peer, refusal)
            return None
        sock.settimeout(self.limits.network_timeout_s)
        return request

    def _check(self, request: bytes) -> None:
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(request)
            calling, called = str(pdu.calling_ae_title).strip(), str(pdu.called_ae_title).strip()
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's malformed request
            raise Refused("request_malformed", f"A-ASSOCIATE-RQ cannot be decoded ({type(exc).__name__}: {exc})",
                          answer=_abort(*ABORT_INVALID_VALUE)) from exc
        allowed = self.limits.allowed_calling_aes
        if allowed and calling not in allowed:
            raise Refused("calling_ae_not_allowed", f"calling AE {calling} is not in "
                          "node.allowed_calling_aes", answer=_reject(*REJECT_CALLING_AE),
                          audit_event="association.rejected", calling_ae=calling, called_ae=called)

    def refuse(self, sock: socket.socket, peer: str, refusal: Refused) -> None:
        """Answer (if the refusal has an answer), close, log one line, count and hand to the audit hook."""
        _close(sock, refusal.answer)
        if not refusal.counted:
            LOG.debug("connection from %s closed: %s", peer, refusal.detail)
            return
        self.record(peer, refusal)

    def record(self, peer: str, refusal: Refused) -> None:
        LOG.warning("refused %s: %s [%s]", peer, printable(refusal.detail, 240), refusal.reason)
        due = self.refusals.add(refusal.reason, peer.rsplit(":", 1)[0])
        try:
            self.on_refused(refusal, peer, due)
        except Exception as exc:  # noqa: BLE001 - the log line above is the record of last resort
            LOG.error("audit of a refusal from %s failed: %s", peer, printable(exc, 200))


def read_request(sock: socket.socket, deadline: float, max_bytes: int) -> bytes:
    """Header and body of the first PDU, which must be an A-ASSOCIATE-RQ of at most `max_bytes`, by `deadline`."""
    got = bytearray()

    def read(n: int) -> None:
        want = len(got) + n
        while len(got) < want:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Refused("request_timeout", f"A-ASSOCIATE-RQ not complete in time "
                              f"(node.association_request_timeout_s): {len(got)} of {_expected(got)} bytes received")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(min(65536, want - len(got)))
            except TimeoutError:
                continue  # the loop's deadline check refuses it
            except OSError as exc:
                chunk, why = b"", f"{type(exc).__name__}: {exc}"
            else:
                why = "the peer closed the connection"
            if not chunk:
                raise Refused("request_incomplete", f"{why} after {len(got)} of {_expected(got)} bytes of its "
                              "A-ASSOCIATE-RQ", counted=bool(got))  # nothing at all: a port probe, not counted
            got.extend(chunk)

    read(HEADER)
    pdu_type, _, length = struct.unpack(">BBL", got)
    if pdu_type != 0x01:
        raise Refused("not_a_request", f"first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
                      answer=b"" if pdu_type == 0x07 else _abort(*ABORT_UNEXPECTED_PDU))
    if length > max_bytes:
        raise Refused("request_too_large", f"A-ASSOCIATE-RQ declares {length} bytes, more than "
                      f"node.max_association_request_bytes={max_bytes}", answer=_abort(*ABORT_INVALID_VALUE))
    read(length)
    return bytes(got)


def _expected(got: bytearray) -> str:
    return str(HEADER + struct.unpack(">L", bytes(got[2:6]))[0]) if len(got) >= HEADER else "6+"


def _handshake(sock: ssl.SSLSocket, deadline: float) -> None:
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.do_handshake()
    except (OSError, ValueError) as exc:  # ssl.SSLError, timeouts, resets
        raise Refused("tls_failed", f"TLS handshake failed: {type(exc).__name__}: {exc}",
                      audit_event="association.tls_failed") from exc


def _abort(source: int, reason: int) -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source, pdu.reason_diagnostic = source, reason
    return bytes(pdu.encode())


def _reject(result: int, source: int, reason: int) -> bytes:
    pdu = A_ASSOCIATE_RJ()
    pdu.result, pdu.source, pdu.reason_diagnostic = result, source, reason
    return bytes(pdu.encode())


def _close(sock: socket.socket, answer: bytes = b"") -> None:
    """Send `answer`, give the peer LINGER_S to read it and hang up (closing on unread data would reset the
    connection and could lose the answer), then close; a peer that goes on sending is reset sooner."""
    try:
        if answer:
            sock.settimeout(LINGER_S)
            sock.sendall(answer)
            sock.shutdown(socket.SHUT_WR)
            end, dropped = time.monotonic() + LINGER_S, 0
            while time.monotonic() < end and dropped < LINGER_BYTES and (chunk := sock.recv(4096)):
                dropped += len(chunk)
    except (OSError, ValueError):
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


class GatedSocket(AssociationSocket):
    """pynetdicom's socket wrapper with the gate's two additions: the A-ASSOCIATE-RQ the gate read is served
    first, and a PDU whose header declares more than `max_pdu_bytes` aborts the association at its header.

    dul.py reads every PDU as `recv(6)` (header) then `recv(length)` (body), strictly alternating, and only
    when `ready` says there is data; both are kept. A short read is the DUL's "connection closed" (Evt17).
    """

    _prefetched: bytearray
    _in_body: bool
    _max_pdu_bytes: int
    _on_refused: Callable[[Refused], None]
    refusal: Refused | None

    def arm(self, request: bytes, max_pdu_bytes: int, on_refused: Callable[[Refused], None]) -> None:
        self._prefetched, self._in_body = bytearray(request), False
        self._max_pdu_bytes, self._on_refused, self.refusal = max_pdu_bytes, on_refused, None

    @property
    def ready(self) -> bool:
        return bool(self._prefetched) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        prefetched = bool(self._prefetched)
        data = self._take(nr_bytes)
        if self._in_body or len(data) != HEADER:  # a body, or a short header (the DUL closes on it)
            self._in_body = False
            return data
        pdu_type, _, length = struct.unpack(">BBL", data)
        if length > self._max_pdu_bytes and not prefetched:
            self._refuse(Refused("pdu_too_large", f"PDU of type 0x{pdu_type:02X} declares {length} bytes, more "
                                 f"than the Maximum Length we negotiated (node.max_pdu_bytes={self._max_pdu_bytes})"))
            return bytearray()  # too short for a header: the DUL sees the connection closed, quietly
        self._in_body = pdu_type in PDU_TYPES  # the DUL reads no body after an unknown type
        return data

    def _take(self, nr_bytes: int) -> bytearray:
        out = self._prefetched[:nr_bytes]
        del self._prefetched[:nr_bytes]
        if len(out) == nr_bytes:
            return out
        try:
            return out + super().recv(nr_bytes - len(out))
        except OSError as exc:  # a timeout in mid-PDU or a reset: a short read instead of the DUL's traceback
            if isinstance(exc, TimeoutError):
                self._refuse(Refused("pdu_timeout", "no data in the middle of a PDU for the network timeout"))
            return out

    def _refuse(self, refusal: Refused) -> None:
        self.refusal = refusal
        answer = _abort(*ABORT_INVALID_VALUE) if refusal.reason == "pdu_too_large" else b""
        try:
            if answer and self.socket is not None:
                self.socket.sendall(answer)
            if self.socket is not None:
                self.socket.shutdown(socket.SHUT_RDWR)  # pynetdicom closes it when the association ends
        except OSError:
            pass
        self._on_refused(refusal)


class GatedRequestHandler(RequestHandler):
    """pynetdicom's request handler for a connection the gate admitted: its socket becomes a `GatedSocket`."""

    def __init__(self, request: socket.socket, client_address: Any, server: Any, first_pdu: bytes) -> None:
        self.first_pdu = first_pdu
        super().__init__(request, client_address, server)  # handles the request (socketserver's way)

    def _create_association(self):  # type: ignore[no-untyped-def]
        assoc = super()._create_association()
        sock = assoc.dul.socket
        # pynetdicom builds its AssociationSocket inline (transport.py); ours only adds the two checks above
        sock.__class__ = GatedSocket
        gate: Gate = self.server.gate
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        sock.arm(self.first_pdu, gate.limits.max_pdu_bytes, lambda refusal: gate.record(peer, refusal))
        return assoc
