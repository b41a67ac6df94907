"""`/health` and `/metrics` against real processes: `rtprop serve --workers 0` (the SCP), two `rtprop worker`
processes and `rtprop web`, all on one storage, fed synthetic cases by DCMTK storescu.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node_helpers import REPO, VENV_BIN, NodeProcess, storescu, wait_for
from pipeline_helpers import synthetic_case
from web_helpers import Client, WebProcess

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")
MAX_AGE_S = 3.0


def config(root: Path) -> dict:
    return {"node": {"series_quiet_period_s": 0.5, "poll_interval_s": 0.2},
            "pipeline": {"poll_interval_s": 0.2, "heartbeat_interval_s": 1.0},
            "storage": {"fsync": False},
            "web": {"heartbeat_interval_s": 0.5, "health_worker_max_age_s": MAX_AGE_S, "health_node_max_age_s": MAX_AGE_S,
                    "audit_verify_interval_s": 0.1}}


class WorkerProcess:
    def __init__(self, node: NodeProcess, n: int) -> None:
        self.node, self.log_path = node, node.root / f"worker{n}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        self.proc = subprocess.Popen([str(VENV_BIN / "rtprop"), "worker", "--config", str(self.node.config_path),
                                      "--storage", str(self.node.storage)], stdout=open(self.log_path, "ab"),
                                     stderr=subprocess.STDOUT, cwd=str(REPO), env=os.environ.copy())
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def health(client: Client) -> tuple[int, dict]:
    status, _, body = client.get("/health")
    return status, json.loads(body)


def timed(predicate, timeout_s: float, what: str) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    wait_for(predicate, timeout_s, 0.2, what=what)
    return time.monotonic() - started


def test_health_turns_503_when_the_scp_stops_or_the_worker_dies_and_back(tmp_path):
    node = NodeProcess(tmp_path / "node", config=config(tmp_path))
    node.args += ["--workers", "0"]
    node.start()
    worker = WorkerProcess(node, 1).start()
    web = WebProcess(tmp_path, node.storage, node.config_path).start()
    client = Client(web.url)
    try:
        timed(lambda: health(client)[0] == 200, 60, "health ok with SCP and worker")
        status, body = health(client)
        assert body["status"] == "ok" and body["checks"]["scp"]["ok"] and body["checks"]["worker"]["alive"] == 1
        assert body["checks"]["database"]["ok"] and body["checks"]["disk"]["ok"]

        node.stop()  # the SCP goes away; the worker and the web app stay
        took = timed(lambda: health(client)[0] == 503, 10, "503 after the SCP stopped")
        status, body = health(client)
        assert body["status"] == "down" and not body["checks"]["scp"]["ok"] and body["checks"]["worker"]["ok"]
        node.start()
        timed(lambda: health(client)[0] == 200, 30, "200 again once the SCP is back")

        worker.stop(signal.SIGKILL)  # killed, no clean shutdown
        took_worker = timed(lambda: health(client)[0] == 503, MAX_AGE_S + 10, "503 after the worker was killed")
        status, body = health(client)
        assert body["status"] == "degraded" and not body["checks"]["worker"]["ok"] and body["checks"]["scp"]["ok"]
        worker.start()
        timed(lambda: health(client)[0] == 200, 60, "200 again once a worker runs")
    finally:
        web.stop()
        worker.stop()
        node.stop()
    assert took < 10 and took_worker < MAX_AGE_S + 10


def test_metrics_parse_and_count_the_jobs_of_two_worker_processes(tmp_path):
    cases = []
    for i in range(6):
        synthetic_case(tmp_path / "cases" / f"c{i}", seed=20 + i, patient_id="MET")
        cases.append(tmp_path / "cases" / f"c{i}")
    node = NodeProcess(tmp_path / "node", config={**config(tmp_path), "pipeline": {
        "poll_interval_s": 0.2, "heartbeat_interval_s": 1.0, "dry_run_aes": ["SCANNER"]}})
    node.args += ["--workers", "0"]
    node.start()
    workers = [WorkerProcess(node, n).start() for n in (1, 2)]
    web = WebProcess(tmp_path, node.storage, node.config_path).start()
    try:
        for case in cases:
            storescu(node.port, sorted(case.iterdir()), calling_ae="SCANNER")
        wait_for(lambda: node.query("SELECT count(*) FROM jobs WHERE state NOT IN ('received','queued','running')")[0][0]
                 == len(cases), 300, 0.5, what="every job to finish")
        _, _, text = Client(web.url).get("/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        db_states = dict(node.query("SELECT state, count(*) FROM jobs GROUP BY state"))
        claimed = {r[0] for r in node.query(
            "SELECT json_extract(details, '$.worker') FROM audit WHERE event='job.claimed'")}
        alive = families["rtprop_workers_alive"].samples[0].value
    finally:
        web.stop()
        for w in workers:
            w.stop()
        node.stop()
    from pipeline.jobs import STATES

    jobs = {s.labels["state"]: s.value for s in families["rtprop_jobs"].samples}
    assert set(jobs) == set(STATES)
    assert jobs == {s: float(db_states.get(s, 0)) for s in STATES}
    assert jobs["validated"] == len(cases)  # dry run: processed, not sent
    assert len({c.split("#")[0] for c in claimed}) == 2, claimed  # both worker processes ran jobs
    assert alive == 2
    hist = {(s.name, s.labels.get("le")): s.value for s in families["rtprop_propagation_seconds"].samples
            if s.labels.get("backend") == "classic"}
    assert hist[("rtprop_propagation_seconds_count", None)] == len(cases)
    assert hist[("rtprop_propagation_seconds_bucket", "+Inf")] == len(cases)
    received = {s.labels["source"]: s.value for s in families["rtprop_instances_received"].samples}
    assert received == {"dimse": float(sum(len(list(c.iterdir())) for c in cases))}
    assert families["rtprop_audit_chain_ok"].samples[0].value == 1
    associations = {s.labels["outcome"]: s.value for s in families["rtprop_associations"].samples
                    if s.name == "rtprop_associations_total"}
    assert associations["released"] >= len(cases) and associations["rejected"] == 0
