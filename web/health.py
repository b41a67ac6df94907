"""`/health` checks and `/metrics` (Prometheus text), both read from the database; neither writes.

Metrics are computed from the database at scrape time, not kept in process memory, so they are the
same whichever process serves them and however many `rtprop worker` processes share the storage.

Health reads the heartbeat rows the node and workers write (db/heartbeat.py) and the disk; it opens
no association and writes nothing (it used to write a heartbeat and C-ECHO the SCP: an unauthenticated
caller could make the node write audit rows at will). One result serves every caller for
`CACHE_S`. Status "ok" (HTTP 200) when every check passes; "down" (503) when the database cannot be
read or no node heartbeat is younger than `web.health_node_max_age_s` (or the node said it stopped);
"degraded" (503) when no worker heartbeat is younger than `web.health_worker_max_age_s`, free disk is
below `storage.min_free_mb`, or the node refused a connection or association within
`web.health_refusals_window_s` (dicom_node/gate.py: half-open or oversized requests, unknown calling
AEs, the association limit ...; the reasons and the addresses are shown).
"""
from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from config.schema import Config
from db.heartbeat import latest
from db.receipts import verify_all
from db.schema import AuditEntry, Heartbeat, Instance, Job, Send
from pipeline.jobs import STATES

PROPAGATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
SEND_STATES = ("pending", "sending", "sent", "dead-letter")
CACHE_S = 1.0  # one health result serves every caller for this long


def live_nodes(session: Session, config: Config) -> list[tuple[Heartbeat, float]]:
    """Node heartbeats younger than `web.health_node_max_age_s` whose node has not said it stopped, youngest first."""
    limit = config.web.health_node_max_age_s
    return [(row, age) for row, age in latest(session, "node")
            if age <= limit and not (row.details or {}).get("stopped")]


def _scp_checks(nodes: list[tuple[Heartbeat, float]], config: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scp, associations) checks from the live node heartbeats."""
    if not nodes:
        scp: dict[str, Any] = {"ok": False, "detail": "no node heartbeat younger than "
                               f"{config.web.health_node_max_age_s:g} s: is `rtprop serve` running?"}
    else:
        d = nodes[0][0].details or {}
        scp = {"ok": True, "address": f"{d.get('ae_title', '')}@{d.get('host', '')}:{d.get('port', '')}",
               "nodes": len(nodes), "youngest_heartbeat_s": round(nodes[0][1], 1)}
    recent: Counter[str] = Counter()
    addresses: Counter[str] = Counter()
    open_, pending = 0, 0
    for row, _ in nodes:
        d = row.details or {}
        refused = d.get("refused") or {}
        recent.update(refused.get("recent") or {})
        addresses.update(refused.get("recent_addresses") or {})
        open_ += int(d.get("associations", 0))
        pending += int(d.get("pending", 0))
    associations = {"ok": not recent, "open": open_, "pending_requests": pending,
                    "refused_recent": dict(recent), "refused_addresses": dict(addresses.most_common(5)),
                    "window_s": config.web.health_refusals_window_s}
    return scp, associations


def health(factory: sessionmaker[Session], config: Config) -> dict[str, Any]:
    """Run every check now (reads only); returns {"status", "checks"} (see the module docstring)."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        with factory() as session:
            nodes = live_nodes(session, config)
            workers = latest(session, "worker")
        checks["database"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        checks["database"] = {"ok": False, "error": error}
        checks["scp"] = {"ok": False, "error": "database unreadable"}
        checks["worker"] = {"ok": False, "error": "database unreadable"}
    else:
        checks["scp"], checks["associations"] = _scp_checks(nodes, config)
        limit = config.web.health_worker_max_age_s
        young = [age for _, age in workers if age <= limit]
        checks["worker"] = {"ok": bool(young), "alive": len(young), "youngest_heartbeat_s":
                            round(min((a for _, a in workers), default=float("inf")), 1) if workers else None,
                            "max_age_s": limit}
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


class CachedHealth:
    """`health()` at most once per CACHE_S, whatever the number of callers."""

    def __init__(self, factory: sessionmaker[Session], config: Config) -> None:
        self.factory, self.config = factory, config
        self._lock = threading.Lock()
        self._last: tuple[float, dict[str, Any]] | None = None

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            if self._last is None or time.monotonic() - self._last[0] >= CACHE_S:
                self._last = (time.monotonic(), health(self.factory, self.config))
            return self._last[1]


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

            nodes = live_nodes(session, self.config)
            refused = CounterMetricFamily("rtprop_connections_refused", "Connections and associations the SCP "
                                          "refused, by reason (dicom_node/gate.py), since each node started",
                                          labels=["reason"])
            totals: Counter[str] = Counter()
            for row, _ in nodes:
                totals.update(((row.details or {}).get("refused") or {}).get("total") or {})
            for reason, n in sorted(totals.items()):
                refused.add_metric([reason], n)
            yield refused
            yield GaugeMetricFamily("rtprop_connections_pending", "Connections still sending their A-ASSOCIATE-RQ",
                                    value=sum(int((r.details or {}).get("pending", 0)) for r, _ in nodes))
            yield GaugeMetricFamily("rtprop_associations_open", "Associations open at the SCP",
                                    value=sum(int((r.details or {}).get("associations", 0)) for r, _ in nodes))

            alive = [age for _, age in latest(session, "worker") if age <= self.config.web.health_worker_max_age_s]
            yield GaugeMetricFamily("rtprop_workers_alive", "Worker processes with a young heartbeat", value=len(alive))

            when, rows, ok = self.audit_status(session)
            yield GaugeMetricFamily("rtprop_audit_chain_ok", "1 if the audit hash chain verified", value=int(ok))
            yield GaugeMetricFamily("rtprop_audit_rows_verified", "Audit rows walked by the last verify", value=rows)
            yield GaugeMetricFamily("rtprop_audit_verified_timestamp_seconds", "When the chain was last verified",
                                    value=when)
