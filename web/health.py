"""`/health` checks and `/metrics` (Prometheus text), both read from the database and real probes.

Metrics are computed from the database at scrape time, not kept in process memory, so they are the
same whichever process serves them and however many `rtprop worker` processes share the storage.

Health: status "ok" (HTTP 200) when every check passes; "down" (503) when the database cannot be
written or the SCP does not answer; "degraded" (503) when no worker heartbeat is younger than
`web.health_worker_max_age_s` or free disk is below `storage.min_free_mb`.
"""
from __future__ import annotations

import shutil
import threading
import time
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from db.receipts import verify_all
from db.heartbeat import beat, latest
from db.schema import AuditEntry, Instance, Job, Send
from pipeline.jobs import STATES

PROPAGATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
SEND_STATES = ("pending", "sending", "sent", "dead-letter")


def scp_address(session: Session, config: Config) -> tuple[str, int, str]:
    """(host, port, AE title) of the node's SCP: the youngest node heartbeat, else the configuration."""
    rows = latest(session, "node")
    if rows:
        d = rows[0][0].details or {}
        if d.get("port"):
            host = d.get("host") or "127.0.0.1"
            return ("127.0.0.1" if host in ("0.0.0.0", "") else host), int(d["port"]), d.get("ae_title", "RTPROP")
    host = config.node.host
    return ("127.0.0.1" if host == "0.0.0.0" else host), config.node.port, config.node.ae_title


def echo(host: str, port: int, called_ae: str, timeout_s: float) -> tuple[bool, str]:
    """C-ECHO the SCP: (answered, what happened). A rejected association still proves it is listening."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="RTPROP-HEALTH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    assoc = ae.associate(host, port, ae_title=called_ae)
    try:
        if assoc.is_established:
            status = assoc.send_c_echo()
            ok = status is not None and int(status.get("Status", -1)) == 0
            return ok, "C-ECHO 0x0000" if ok else "C-ECHO without success status"
        if assoc.is_rejected:
            return True, "listening (association rejected for our AE title)"
        return False, f"no association with {called_ae}@{host}:{port}"
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def health(factory: sessionmaker[Session], config: Config, me: str) -> dict[str, Any]:
    """Run every check now; returns {"status", "checks"} (see the module docstring)."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        beat(factory, me, "web")  # a real write-locked write
        checks["database"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001
        checks["database"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        with factory() as session:
            host, port, ae = scp_address(session, config)
            workers = latest(session, "worker")
        ok, what = echo(host, port, ae, config.web.health_echo_timeout_s)
        checks["scp"] = {"ok": ok, "address": f"{ae}@{host}:{port}", "detail": what}
        limit = config.web.health_worker_max_age_s
        young = [age for _, age in workers if age <= limit]
        checks["worker"] = {"ok": bool(young), "alive": len(young), "youngest_heartbeat_s":
                            round(min((a for _, a in workers), default=float("inf")), 1) if workers else None,
                            "max_age_s": limit}
    except Exception as exc:  # noqa: BLE001
        checks.setdefault("scp", {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        checks.setdefault("worker", {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    free_mb = shutil.disk_usage(config.storage.root).free / 2**20
    checks["disk"] = {"ok": free_mb >= config.storage.min_free_mb, "free_mb": round(free_mb),
                      "min_free_mb": config.storage.min_free_mb}
    if not checks["database"]["ok"] or not checks["scp"]["ok"]:
        status = "down"
    elif not all(c["ok"] for c in checks.values()):
        status = "degraded"
    else:
        status = "ok"
    return {"status": status, "checks": checks}


class DatabaseCollector(Collector):
    """Prometheus metrics read from the database on every scrape (one definition for every process)."""

    def __init__(self, factory: sessionmaker[Session], config: Config) -> None:
        self.factory = factory
        self.config = config
        self._verified: tuple[float, int, bool] | None = None  # (when, rows, ok)
        self._lock = threading.Lock()

    def audit_status(self, session: Session) -> tuple[float, int, bool]:
        with self._lock:
            if self._verified is None or time.time() - self._verified[0] > self.config.web.audit_verify_interval_s:
                rows, problems, _ = verify_all(session)
                self._verified = (time.time(), rows, not problems)
            return self._verified

    def collect(self) -> Iterator[Any]:
        with self.factory() as session:
            jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            g = GaugeMetricFamily("rtprop_jobs", "Jobs by state (pipeline/jobs.py names)", labels=["state"])
            for state in STATES:
                g.add_metric([state], jobs.get(state, 0))
            yield g

            c = CounterMetricFamily("rtprop_instances_received", "DICOM instances stored", labels=["source"])
            for source, n in session.execute(select(Instance.source, func.count()).group_by(Instance.source)):
                c.add_metric([source or ""], n)
            yield c

            events = dict(session.execute(select(AuditEntry.event, func.count()).where(AuditEntry.event.in_(
                ("association.released", "association.aborted", "association.rejected", "association.tls_failed",
                 "instance.quarantined"))).group_by(AuditEntry.event)).all())
            a = CounterMetricFamily("rtprop_associations", "Associations with the SCP, by how they ended",
                                    labels=["outcome"])
            for outcome in ("released", "aborted", "rejected", "tls_failed"):
                a.add_metric([outcome], events.get(f"association.{outcome}", 0))
            yield a
            yield CounterMetricFamily("rtprop_instances_quarantined", "Instances held in quarantine",
                                      value=events.get("instance.quarantined", 0))

            sends = dict(session.execute(select(Send.state, func.count()).group_by(Send.state)).all())
            s = GaugeMetricFamily("rtprop_sends", "Outbound C-STORE rows by outcome", labels=["state"])
            for state in SEND_STATES:
                s.add_metric([state], sends.get(state, 0))
            yield s
            attempts = session.execute(select(func.coalesce(func.sum(Send.attempts), 0))).scalar()
            yield CounterMetricFamily("rtprop_send_attempts", "C-STORE attempts made", value=attempts)

            q = GaugeMetricFamily("rtprop_queue_depth", "Work waiting", labels=["queue"])
            q.add_metric(["jobs"], jobs.get("received", 0) + jobs.get("queued", 0))
            q.add_metric(["review"], jobs.get("awaiting_review", 0))
            q.add_metric(["sends"], sends.get("pending", 0) + sends.get("sending", 0))
            yield q

            h = HistogramMetricFamily("rtprop_propagation_seconds", "Propagation time per job (timings_s.propagate_s)",
                                      labels=["backend"])
            per_backend: dict[str, list[float]] = {}
            for backend, timings in session.execute(select(Job.backend, Job.timings_s).where(Job.backend != "")):
                if timings and "propagate_s" in timings:
                    per_backend.setdefault(backend, []).append(float(timings["propagate_s"]))
            for backend, values in sorted(per_backend.items()):
                counts = [sum(v <= b for v in values) for b in PROPAGATION_BUCKETS]
                buckets = [(str(b), n) for b, n in zip(PROPAGATION_BUCKETS, counts)] + [("+Inf", len(values))]
                h.add_metric([backend], buckets, sum_value=sum(values))
            yield h

            alive = [age for _, age in latest(session, "worker") if age <= self.config.web.health_worker_max_age_s]
            yield GaugeMetricFamily("rtprop_workers_alive", "Worker processes with a young heartbeat", value=len(alive))

            when, rows, ok = self.audit_status(session)
            yield GaugeMetricFamily("rtprop_audit_chain_ok", "1 if the audit hash chain verified", value=int(ok))
            yield GaugeMetricFamily("rtprop_audit_rows_verified", "Audit rows walked by the last verify", value=rows)
            yield GaugeMetricFamily("rtprop_audit_verified_timestamp_seconds", "When the chain was last verified",
                                    value=when)
