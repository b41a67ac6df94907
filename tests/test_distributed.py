"""The distributed mode on a real PostgreSQL (Debian's, started by the tests) with real processes:
receivers `rtprop serve --workers 0`, `rtprop worker`s of the job engine, DCMTK storescu as the TPS that
sends and DCMTK storescp as the TPS that receives (docs/scaling.md)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
import yaml

from distributed_helpers import Receiver, WorkerProcess, cluster_config
from node_helpers import ENV, VENV_BIN, StoreSCP, free_port, make_ct_series, storescu, wait_for
from pipeline_helpers import synthetic_case

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")


def audit_verify(config: Path, storage: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "rtprop"), "audit", "verify", "--config", str(config), "--storage",
                           str(storage)], capture_output=True, text=True, timeout=120)


def _pid_of(claimed_by: str) -> int:
    return int(claimed_by.split("#", 1)[0].rsplit(":", 2)[1])


def test_three_workers_one_receiver_twenty_studies_each_result_once_through_two_kills(tmp_path, postgres):
    url = postgres.create_database()
    cases = []
    for seed in range(20):
        folder = tmp_path / "cases" / f"c{seed:02d}"
        synthetic_case(folder, seed=100 + seed)
        cases.append(sorted(folder.iterdir()))
    storage = tmp_path / "storage"
    with StoreSCP(tmp_path / "tps") as tps:
        config = cluster_config(tmp_path / "cluster.yaml", url, tps_port=tps.port)
        receiver = Receiver(tmp_path / "rx", config, storage, free_port()).start()
        workers = [WorkerProcess(tmp_path / "w", config, storage, name, "--concurrency", "1").start()
                   for name in "abc"]
        spare = None
        try:
            senders = [threading.Thread(target=storescu, args=(receiver.port, files), kwargs={"calling_ae": "TPS"})
                       for files in cases]
            for t in senders:
                t.start()
            # SIGKILL a worker while it runs a job (its child process dies with it)
            by_pid = {w.pid: w for w in workers}
            claimed = wait_for(lambda: postgres.query(url, "SELECT id, claimed_by FROM jobs WHERE state = 'running'"),
                               120, 0.05, what="a running job")
            killed_job, owner = claimed[0]
            victim = by_pid[_pid_of(owner)]
            victim.kill()
            for t in senders:
                t.join(120)
            # SIGKILL another worker while it sends: the TPS is frozen (SIGSTOP) so the C-STORE hangs there
            tps.proc.send_signal(signal.SIGSTOP)
            try:
                alive = {w.pid: w for w in workers if w is not victim}
                sending = wait_for(lambda: [r for r in postgres.query(
                    url, "SELECT id, claimed_by FROM sends WHERE state = 'sending'") if _pid_of(r[1]) in alive],
                    180, 0.05, what="a send in flight")
                killed_send, sender = sending[0]
                alive[_pid_of(sender)].kill()
            finally:
                tps.proc.send_signal(signal.SIGCONT)
            spare = WorkerProcess(tmp_path / "w", config, storage, "d", "--concurrency", "1").start()  # as systemd would
            wait_for(lambda: postgres.query(url, "SELECT count(*) FROM jobs WHERE state IN ('sent', 'failed', "
                                                 "'dead-letter')")[0][0] == 20, 300, 0.5, what="20 jobs to finish")
            time.sleep(3)  # anything sent twice would have arrived by now
        finally:
            for w in [*workers, spare]:
                if w is not None:
                    w.stop()
            receiver.stop()
        files = tps.files()
        stores = tps.stores_received()
    jobs = postgres.query(url, "SELECT id, state, attempts, study_instance_uid, error FROM jobs ORDER BY id")
    assert [j[1] for j in jobs] == ["sent"] * 20, jobs
    sends = postgres.query(url, "SELECT job_id, state, sop_instance_uid, attempts FROM sends ORDER BY job_id")
    assert len(sends) == 20 and {s[0] for s in sends} == {j[0] for j in jobs} and {s[1] for s in sends} == {"sent"}
    # at the TPS: 20 RTSTRUCTs, one per study, each the instance its send row names
    received = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert len(received) == 20
    assert {str(d.SOPInstanceUID) for d in received} == {s[2] for s in sends}
    assert {str(d.StudyInstanceUID) for d in received} == {j[3] for j in jobs}
    # the killed job ran again on another worker; the killed send went again, with the same SOP Instance UID
    assert dict((j[0], j[2]) for j in jobs)[killed_job] >= 2
    events = postgres.query(url, "SELECT event, job_id FROM audit WHERE event IN ('job.recovered', 'send.recovered')")
    assert ("job.recovered", killed_job) in events and any(e == "send.recovered" for e, _ in events)
    print(f"C-STORE requests at the TPS: {stores} for 20 results (a re-sent instance overwrites its own file)")
    r = audit_verify(config, storage)
    assert r.returncode == 0 and '"ok": true' in r.stdout, r.stdout + r.stderr
    # the web app reads the same database: every job, the metrics and the audit chain's state
    from web_helpers import Client, WebProcess, rtprop

    rtprop("users", "add", "ada", "--role", "admin", "--password-stdin", "--config", str(config), "--storage",
           str(storage), stdin="a-long-password\n")
    with WebProcess(tmp_path, storage, config) as web:
        client = Client(web.url)
        assert client.login("ada", "a-long-password") in (302, 303)
        status, _, body = client.get("/api/v1/jobs")
        assert status == 200 and sorted(j["state"] for j in json.loads(body)["jobs"]) == ["sent"] * 20
        status, _, metrics = client.get("/metrics")
        assert status == 200 and b'rtprop_jobs{state="sent"} 20.0' in metrics
        assert b"rtprop_audit_chain_ok 1.0" in metrics


def test_postgres_down_for_30_s_loses_nothing_acknowledged_and_the_node_recovers(tmp_path, postgres):
    """Instances keep arriving while the database is stopped: each is acknowledged and stored, or refused
    with a failure status (0xA700); afterwards the same processes (a receiver and a worker, never
    restarted) take the rest, the refused ones sent again, and a new case comes back from the worker."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    url = postgres.create_database()
    storage = tmp_path / "storage"
    tps = StoreSCP(tmp_path / "tps").start()
    config = cluster_config(tmp_path / "cluster.yaml", url, tps_port=tps.port)
    datasets = [pydicom.dcmread(f) for f in make_ct_series(tmp_path / "src", 60)]
    case = tmp_path / "case"
    synthetic_case(case, seed=7)
    receiver = Receiver(tmp_path / "rx", config, storage, free_port()).start()
    worker = WorkerProcess(tmp_path / "w", config, storage, "a").start()
    ae = AE(ae_title="TPS")
    ae.add_requested_context(CTImageStorage)

    def send(ds: pydicom.Dataset) -> int | None:
        """One instance in an association of its own, as a TPS retrying would; the status (None: no answer)."""
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="RTPROP")
        if not assoc.is_established:
            return None
        rsp = assoc.send_c_store(ds)
        assoc.release()
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None

    first: dict[str, int | None] = {}
    try:
        for ds in datasets[:10]:
            first[str(ds.SOPInstanceUID)] = send(ds)
        postgres.stop("fast")
        t0 = time.monotonic()
        for n, ds in enumerate(datasets[10:40], start=1):  # one a second for 30 s, the database down
            first[str(ds.SOPInstanceUID)] = send(ds)
            time.sleep(max(0.0, t0 + n - time.monotonic()))
        down_s = time.monotonic() - t0
        postgres.start()
        for ds in datasets[40:]:
            first[str(ds.SOPInstanceUID)] = send(ds)
        final = dict(first)

        def resend_refused() -> bool:  # what the TPS does with a refused instance
            for ds in datasets:
                if final[str(ds.SOPInstanceUID)] != 0x0000:
                    final[str(ds.SOPInstanceUID)] = send(ds)
            return all(v == 0x0000 for v in final.values())

        wait_for(resend_refused, 60, 1, what="the refused instances to be taken when sent again")
        storescu(receiver.port, sorted(case.iterdir()), calling_ae="TPS")
        wait_for(tps.files, 120, 0.5, what="the new case's result from the worker that lived through the outage")
    finally:
        if not postgres.ready():  # the server is the session's: never leave it stopped for the next test
            postgres.start()
        worker.stop()
        receiver.stop()
        tps.stop()
    assert receiver.log().count("listening as RTPROP") == 1  # one start: it lived through the outage
    assert worker.log().count("rtprop worker ready") == 1
    acknowledged_first = {uid for uid, status in first.items() if status == 0x0000}
    while_down = [first[str(ds.SOPInstanceUID)] for ds in datasets[10:40]]
    stored = dict(postgres.query(url, "SELECT sop_instance_uid, path FROM instances"))
    assert down_s >= 29
    assert set(while_down) == {0xA700}, while_down  # refused, out of resources: nothing acknowledged
    assert {str(d.SOPInstanceUID) for d in datasets[:10]} <= acknowledged_first
    assert acknowledged_first <= set(stored)  # nothing acknowledged is lost
    assert set(stored) >= {str(d.SOPInstanceUID) for d in datasets}  # and in the end every one went in, once
    assert len(stored) == 60 + 13  # and the case (12 images + its prompt)
    assert all(Path(p).is_file() for p in stored.values())
    assert postgres.query(url, "SELECT sum((details::json->>'instances')::int) FROM audit "
                              "WHERE event = 'instances.received'")[0][0] == 60 + 13  # every stored one in a receipt
    assert audit_verify(config, storage).returncode == 0


def test_two_receivers_on_one_port_take_2000_instances_without_loss_duplicate_or_double_completion(tmp_path, postgres):
    url = postgres.create_database()
    storage = tmp_path / "storage"
    config = cluster_config(tmp_path / "cluster.yaml", url, node={"reuse_port": True, "series_quiet_period_s": 2.0})
    port = free_port()
    receivers = [Receiver(tmp_path / f"rx{i}", config, storage, port).start() for i in range(2)]
    per, parallel = 250, 8
    sources = [make_ct_series(tmp_path / f"src{i}", per, prefix=f"a{i}-") for i in range(parallel)]
    try:
        procs = [subprocess.Popen(["storescu", "-aet", f"LOAD{i}", "-aec", "RTPROP", "127.0.0.1", str(port),
                                   *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
                 for i, files in enumerate(sources)]
        failures = [p.communicate(timeout=600)[1].decode(errors="replace")[-300:] for p in procs]
        assert [p.returncode for p in procs] == [0] * parallel, failures
        wait_for(lambda: postgres.query(url, "SELECT count(*) FROM series WHERE state = 'complete'")[0][0] == parallel,
                 60, 0.5, what="every series to complete")
        time.sleep(3)  # a second completion would show by now
    finally:
        for r in receivers:
            r.stop()
    served = [r.log().count("series ") for r in receivers]
    rows, distinct = postgres.query(url, "SELECT count(*), count(DISTINCT sop_instance_uid) FROM instances")[0]
    assert (rows, distinct) == (per * parallel, per * parallel)
    archive = [p for p in (storage / "archive").rglob("*.dcm")]
    assert len(archive) == per * parallel
    completed = postgres.query(url, "SELECT series_instance_uid, count(*) FROM audit WHERE event = 'series.complete' "
                                    "GROUP BY series_instance_uid")
    assert len(completed) == parallel and {n for _, n in completed} == {1}
    assert postgres.query(url, "SELECT sum(instance_count) FROM series")[0][0] == per * parallel
    taken = postgres.query(url, "SELECT details::json->>'received_by', sum((details::json->>'instances')::int) "
                                "FROM audit WHERE event = 'instances.received' GROUP BY 1")
    assert len(taken) == 2, f"the kernel gave every association to one receiver: {taken}"
    print("instances per receiver:", taken, "completion log lines per receiver:", served)
    assert audit_verify(config, storage).returncode == 0


def test_batch_distributed_puts_one_item_per_study_on_the_batch_queue_and_a_worker_reports(tmp_path, postgres):
    """`rtprop batch --distributed` on the sts-001 archive (CT + MR GTVs, one study) taken in on PostgreSQL:
    one message on the `batch` queue; a `--queues batch` worker re-contours both structures on the series
    each was drawn on and writes the run's drift.csv, as the one-process batch does."""
    import csv

    from config.load import load_config, resolve_storage
    from db.engine import open_configured
    from pipeline_helpers import ingest_sts_archive

    url = postgres.create_database()
    storage = tmp_path / "storage"
    config_path = cluster_config(tmp_path / "cluster.yaml", url, node={"series_quiet_period_s": 0})
    config = resolve_storage(load_config(config_path, overrides={"storage": {"root": str(storage)}}))
    ingest_sts_archive(config, open_configured(config))

    out = tmp_path / "report"
    r = subprocess.run([str(VENV_BIN / "rtprop"), "batch", "--config", str(config_path), "--storage", str(storage),
                        "--distributed", "--roi-regex", "GTV.*", "--out", str(out), "--since", "2000-01-01"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    queued = json.loads(r.stdout.strip().splitlines()[-1])
    assert queued["queued_studies"] == 1 and queued["rois"] == 2
    assert postgres.query(url, "SELECT queue_name, task_name, status FROM procrastinate_jobs") == [
        ("batch", "rtprop.batch_study", "todo")]
    worker = WorkerProcess(tmp_path / "w", config_path, storage, "batch", "--queues", "batch").start()
    try:
        drift = Path(queued["out"]) / "drift.csv"
        wait_for(drift.exists, 600, 1, what="the distributed batch's drift.csv")
    finally:
        worker.stop()
    rows = list(csv.DictReader(open(drift)))
    assert {row["roi"]: row["modality"] for row in rows} == {"GTV_Mass_CT": "CT", "GTV_Mass_MR_T1": "MR"}
    assert all(row["error"] == "" and 0.3 < float(row["dice"]) <= 1 for row in rows), rows
    events = [e for (e,) in postgres.query(url, "SELECT event FROM audit WHERE component = 'batch'")]
    assert events.count("batch.roi") == 2 and events.count("batch.finished") == 1


def test_sigterm_drains_a_worker_its_running_job_finishes_and_nothing_new_starts(tmp_path, postgres):
    url = postgres.create_database()
    storage = tmp_path / "storage"
    cases = []
    for seed in range(2):
        synthetic_case(tmp_path / f"c{seed}", seed=300 + seed)
        cases.append(sorted((tmp_path / f"c{seed}").iterdir()))
    with StoreSCP(tmp_path / "tps") as tps:
        config = cluster_config(tmp_path / "cluster.yaml", url, tps_port=tps.port)
        receiver = Receiver(tmp_path / "rx", config, storage, free_port()).start()
        worker = WorkerProcess(tmp_path / "w", config, storage, "a", "--concurrency", "1").start()
        try:
            storescu(receiver.port, cases[0], calling_ae="TPS")
            wait_for(lambda: postgres.query(url, "SELECT id FROM jobs WHERE state = 'running'"), 120, 0.05,
                     what="the job to run")
            worker.proc.send_signal(signal.SIGTERM)  # drain
            storescu(receiver.port, cases[1], calling_ae="TPS")  # arrives while it drains
            worker.proc.wait(120)
            states = dict(postgres.query(url, "SELECT id, state FROM jobs"))
            # the running job finished and its result is queued (or already sent); nothing else started (the
            # receiver creates the second case's job when its series completes: it waits, unclaimed)
            assert worker.proc.returncode == 0 and states[1] in ("sending", "sent"), (states, worker.log()[-2000:])
            assert all(state in ("received", "queued") for job_id, state in states.items() if job_id != 1), states
            assert postgres.query(url, "SELECT count(*) FROM jobs WHERE id <> 1 AND attempts > 0") == [(0,)]
            assert postgres.query(url, "SELECT state FROM sends")[0][0] in ("pending", "sent")
            nxt = WorkerProcess(tmp_path / "w", config, storage, "b").start()  # the next worker does the rest
            wait_for(lambda: len(tps.files()) == 2, 120, 0.5, what="both results, the second from the next worker")
            nxt.stop()
        finally:
            receiver.stop()
    assert postgres.query(url, "SELECT state, attempts FROM jobs ORDER BY id") == [("sent", 1), ("sent", 1)]


def test_routes_only_in_the_receivers_configuration_every_result_arrives_once(tmp_path, postgres):
    """docs/scaling.md's layout with the routes written only in the receiver's configuration: the workers'
    file names no destination at all. Each job carries the route its receiver decided when the job was
    created (issue 21, item 2): every result reaches the TPS once, a dry-run calling AE's never, and
    `rtprop jobs show` on a worker's configuration says where each went."""
    url = postgres.create_database()
    cases = {}
    for seed in range(6):
        folder = tmp_path / "cases" / f"c{seed:02d}"
        synthetic_case(folder, seed=300 + seed)
        cases[folder] = "SHADOW" if seed >= 4 else "TPS"
    storage = tmp_path / "storage"
    with StoreSCP(tmp_path / "tps") as tps:
        calm = {"heartbeat_timeout_s": 120.0}  # nobody is killed here: a loaded machine must not look like it
        rx_config = cluster_config(tmp_path / "receiver.yaml", url, tps_port=tps.port, pipeline=calm)
        rx_yaml = yaml.safe_load(rx_config.read_text())
        rx_yaml["node"]["routes"] = [{"calling_ae": "SHADOW", "destination": "tps", "dry_run": True}]
        rx_config.write_text(yaml.safe_dump(rx_yaml))
        worker_config = cluster_config(tmp_path / "worker.yaml", url, pipeline=calm)
        assert "destinations" not in worker_config.read_text() and "routes" not in worker_config.read_text()
        receiver = Receiver(tmp_path / "rx", rx_config, storage, free_port()).start()
        workers = [WorkerProcess(tmp_path / "w", worker_config, storage, name, "--concurrency", "1").start()
                   for name in "ab"]
        try:
            senders = [threading.Thread(target=storescu, args=(receiver.port, sorted(folder.iterdir())),
                                        kwargs={"calling_ae": ae}) for folder, ae in cases.items()]
            for t in senders:
                t.start()
            for t in senders:
                t.join(120)
            wait_for(lambda: postgres.query(url, "SELECT count(*) FROM jobs WHERE state = 'sent' OR (state = "
                                                 "'validated' AND dry_run)")[0][0] == 6, 300, 0.5,
                     what="6 jobs to be sent or end as dry runs")
            time.sleep(3)  # anything sent twice would have arrived by now
        finally:
            for w in workers:
                w.stop()
            receiver.stop()
        files, stores = tps.files(), tps.stores_received()
    jobs = postgres.query(url, "SELECT id, state, calling_ae, dry_run, route, error FROM jobs ORDER BY id")
    assert sorted((j[1], j[2], j[3]) for j in jobs) == [("sent", "TPS", False)] * 4 + [("validated", "SHADOW", True)] * 2
    assert all(j[5] == "" for j in jobs), jobs  # no "no destination" anywhere
    for job in jobs:
        route = job[4] if isinstance(job[4], dict) else json.loads(job[4])
        assert (route["ae_title"], route["port"], route.get("dry_run", False)) == ("TPS", tps.port, job[2] == "SHADOW")
    assert len(files) == 4 and stores == 4
    sends = postgres.query(url, "SELECT job_id, state FROM sends")
    assert sorted(s[0] for s in sends) == sorted(j[0] for j in jobs if j[1] == "sent")
    for job_id, ae, said in ((next(j[0] for j in jobs if j[2] == "TPS"), "TPS", f"TPS@127.0.0.1:{tps.port}"),
                             (next(j[0] for j in jobs if j[2] == "SHADOW"), "SHADOW", "dry run, never sent")):
        show = subprocess.run([str(VENV_BIN / "rtprop"), "jobs", "show", str(job_id), "--json", "--config",
                               str(worker_config), "--storage", str(storage)], capture_output=True, text=True,
                              timeout=120)
        assert show.returncode == 0, show.stderr
        assert json.loads(show.stdout)["job"]["destination"].startswith(said), (ae, show.stdout[:300])
