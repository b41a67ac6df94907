"""Where the parts of rtprop meet (issue 21, items 7-12): start-up errors, what every command refuses alike,
a prompt sent again, state shown to people kept current, and inputs `evaluate`/`convert` must refuse.
Real processes, a real SQLite database, DCMTK as the TPS."""
from __future__ import annotations

import json
import os
import pty
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from node_helpers import REPO, VENV_BIN, NodeProcess, StoreSCP, storescu, wait_for
from pipeline_helpers import claimed_dropin_job, synthetic_case

RTPROP = str(VENV_BIN / "rtprop")


def run(*args, stdin=subprocess.DEVNULL, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RTPROP, *map(str, args)], stdin=stdin, capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))


def node_storage(root: Path) -> Path:
    """A node's storage root with its database (made as `rtprop users add` makes it before the first start)."""
    r = subprocess.run([RTPROP, "users", "add", "ada", "--role", "admin", "--password-stdin", "--storage", str(root)],
                       input="a-long-password\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return root


# ------------------------------------------------------------------------------------------- item 7
def test_busy_dicom_and_http_ports_are_start_up_errors_naming_the_port(tmp_path):
    """A busy DICOM port exited 1 ("internal error"); a busy --http-port left the node running without its web
    app and /health. Both are exit 2, naming the port, and nothing starts."""
    with socket.socket() as busy, socket.socket() as spare:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        spare.bind(("127.0.0.1", 0))
        taken, free = busy.getsockname()[1], spare.getsockname()[1]
        spare.close()
        dicom = run("serve", "--storage", tmp_path / "a", "--port", taken, timeout=60)
        assert dicom.returncode == 2, dicom.stderr
        assert f"node.port {taken}" in dicom.stderr and "rtprop node ready" not in dicom.stderr
        try:
            web = run("serve", "--storage", tmp_path / "b", "--port", free, "--http-port", taken, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the node kept running without its web app")
        assert web.returncode == 2, web.stderr
        assert f"web.port {taken}" in web.stderr and "rtprop node ready" not in web.stderr


# ------------------------------------------------------------------------------------------- item 8
def test_every_command_refuses_alike_and_says_why(tmp_path):
    storage = node_storage(tmp_path / "node")
    for state in ("awaiting_review", "rejected", "cancelled"):  # every state of pipeline/jobs.py
        r = run("jobs", "list", "--state", state, "--storage", storage)
        assert r.returncode == 0, (state, r.stderr)
    typo = tmp_path / "nodee"
    for args in (["worker", "--once"], ["dropin", "--once"], ["jobs", "list"], ["audit", "verify"], ["batch"]):
        r = run(*args, "--storage", typo)
        assert r.returncode == 2 and "no rtprop database" in r.stderr, (args, r.stderr)
    assert not typo.exists()  # no new, empty node made by a typo
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: [1\n")
    r = run("jobs", "list", "--config", bad, "--storage", storage)
    assert r.returncode == 2 and str(bad) in r.stderr and "line 3" in r.stderr and "<unicode string>" not in r.stderr
    r = run("batch", "--storage", storage, "--roi-regex", "(")
    assert r.returncode == 2 and "--roi-regex" in r.stderr and "internal error" not in r.stderr
    r = run("users", "add", "bob", "--role", "viewer", "--storage", storage)  # stdin is no terminal
    assert r.returncode == 2 and "--password-stdin" in r.stderr
    unknown = tmp_path / "backend.yaml"
    unknown.write_text("propagation:\n  backend: sam3\n")
    r = run("jobs", "list", "--config", unknown, "--storage", storage)
    assert r.returncode == 2 and "propagation.backend" in r.stderr and "sam3" in r.stderr


# ------------------------------------------------------------------------------------------- item 10
def test_a_prompt_sent_again_gets_its_result_again_or_is_told_what_its_job_does(tmp_path):
    """A TPS that sends the same prompt RTSTRUCT again got nothing back. Delivered: the result goes again (same
    SOP Instance UID, stored once by the TPS); still waiting (here: for a reviewer): the log and audit say so."""
    sent_case, held_case = tmp_path / "cases" / "sent", tmp_path / "cases" / "held"
    synthetic_case(sent_case, seed=41)
    synthetic_case(held_case, seed=42)
    with StoreSCP(tmp_path / "tps") as tps:
        node = NodeProcess(tmp_path / "node", destination=f"TPS@127.0.0.1:{tps.port}", config={
            "storage": {"fsync": False}, "review": {"per_calling_ae": {"REVIEWED": True}},
            "node": {"series_quiet_period_s": 0.5, "poll_interval_s": 0.2}, "pipeline": {"poll_interval_s": 0.2}})
        with node:
            storescu(node.port, sorted(sent_case.iterdir()), calling_ae="PLANNER")
            storescu(node.port, sorted(held_case.iterdir()), calling_ae="REVIEWED")
            wait_for(lambda: sorted(s for (s,) in node.query("SELECT state FROM jobs")) == ["awaiting_review", "sent"],
                     180, 0.3, what="one job sent, one awaiting review")
            wait_for(lambda: tps.stores_received() == 1, 30, what="the first delivery")
            first = pydicom.dcmread(tps.files()[0]).SOPInstanceUID
            storescu(node.port, [sent_case / "RS_prompt.dcm"], calling_ae="PLANNER")
            storescu(node.port, [held_case / "RS_prompt.dcm"], calling_ae="REVIEWED")
            wait_for(lambda: tps.stores_received() == 2, 60, what="the result sent again")
            time.sleep(2)
            said = {json.loads(d)["state"]: json.loads(d)["outcome"] for (d,) in node.query(
                "SELECT details FROM audit WHERE event = 'job.prompt_again'")}
            log = node.log()
        assert tps.stores_received() == 2 and len(tps.files()) == 1
        assert pydicom.dcmread(tps.files()[0]).SOPInstanceUID == first  # the same instance, again
    assert "sent again" in said["sent"] and "waiting for a reviewer" in said["awaiting_review"]
    assert log.count("received again from") == 2


# ------------------------------------------------------------------------------------------- item 11
def test_a_recovered_job_that_succeeds_shows_no_old_error(tmp_path):
    """"attempt 1 lost" stayed the error of a job that then went out; the audit keeps the history."""
    from config.load import load_config, resolve_storage
    from db.engine import open_database
    from db.schema import AuditEntry, Job
    from pipeline import jobs as J
    from pipeline.dropin import DropIn
    from pipeline.worker import Worker

    config = resolve_storage(load_config(None, overrides={
        "storage": {"root": str(tmp_path / "s"), "fsync": False}, "node": {"series_quiet_period_s": 0},
        "pipeline": {"poll_interval_s": 0.1, "isolate_jobs": False}, "dropin": {"stable_s": 0}}))
    factory = open_database(config.storage.database)
    case = tmp_path / "inbox-case"
    synthetic_case(case, seed=43)
    config.dropin.inbox.mkdir(parents=True)
    shutil.copytree(case, config.dropin.inbox / case.name)
    DropIn(factory, config).take_all()
    worker = Worker(factory, config)
    worker.housekeeping()
    assert J.claim_next(factory, "gone:1:1#w0") is not None  # a worker claims it and dies
    assert J.recover_stale(factory, heartbeat_timeout_s=60, max_attempts=3, owner_alive=lambda _: False)
    with factory() as session:
        assert "attempt 1 lost" in session.query(Job).one().error
    worker.drain(120)
    with factory() as session:
        job = session.query(Job).one()
        assert job.state == "sent" and job.error == "", (job.state, job.error)
        assert session.query(AuditEntry).filter(AuditEntry.event == "job.recovered").count() == 1
    factory.kw["bind"].dispose()


def test_a_cleanly_stopped_process_is_not_shown_or_counted_as_running(tmp_path):
    """The dashboard listed stopped nodes as listening, /health counted a stopped worker alive for 30 s."""
    from db.engine import open_database
    from db.heartbeat import latest, start_heartbeat

    factory = open_database(tmp_path / "rtprop.sqlite")
    stop = threading.Event()
    threads = [start_heartbeat(factory, f"here:{i}:1#{kind}", kind, stop, interval_s=0.1,
                               details={"ae_title": "RTPROP", "host": "127.0.0.1", "port": 104})
               for i, kind in enumerate(("node", "worker"))]
    wait_for(lambda: all(len(latest(factory(), k)) == 1 for k in ("node", "worker")), 10, what="two heartbeats")
    stop.set()
    for t in threads:
        t.join(10)
    with factory() as session:
        assert latest(session, "node") == [] and latest(session, "worker") == []
    factory.kw["bind"].dispose()


def test_the_tps_profile_name_length_is_the_one_used(monkeypatch, tmp_path):
    """TpsProfile.max_name_len was never read (16 hard-coded): a TPS taking 12 characters gets 12."""
    from dataclasses import replace

    from config.schema import RTStructConfig
    from converters import tps
    from converters.rtstruct_write import RoiMask, write_rtstruct
    from converters.series import read_series

    case = tmp_path / "case"
    made = synthetic_case(case, seed=44)
    monkeypatch.setitem(tps.PROFILES, "monaco", replace(tps.PROFILES["monaco"], max_name_len=12))
    settings = RTStructConfig(tps_profile="monaco")
    path = write_rtstruct(read_series(case), [RoiMask("Parotid_Left_Superficial", made["mask"]),
                                              RoiMask("Parotid_Left_Superficial_2", made["mask"])],
                          tmp_path / "RS.dcm", settings)
    names = [str(r.ROIName) for r in pydicom.dcmread(path).StructureSetROISequence]
    assert all(len(n) <= 12 for n in names) and len({n.lower() for n in names}) == 2, names
    assert all(n.endswith("_prop") for n in names)


# ------------------------------------------------------------------------------------------- item 12
def test_evaluate_refuses_an_image_as_a_mask_and_convert_refuses_a_normalise_it_cannot_honour(tmp_path):
    """`evaluate` scored a CT image given as the reference mask (Dice 0.106, exit 0); `convert x.mha
    --normalise` silently wrote raw values."""
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray((rng.normal(40, 30, (8, 16, 16))).astype(np.float32))
    mask = sitk.GetImageFromArray((rng.random((8, 16, 16)) > 0.5).astype(np.uint8))
    for img in (image, mask):
        img.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    r = run("evaluate", tmp_path / "mask.nii.gz", tmp_path / "ct.nii.gz")
    assert r.returncode == 2 and "ct.nii.gz" in r.stderr and "not a binary mask" in r.stderr, r.stderr
    assert run("evaluate", tmp_path / "mask.nii.gz", tmp_path / "mask.nii.gz").returncode == 0
    r = run("convert", tmp_path / "ct.nii.gz", tmp_path / "x.mha", "--normalise")
    assert r.returncode == 2 and "--normalise" in r.stderr and not (tmp_path / "x.mha").exists()
    assert run("convert", tmp_path / "ct.nii.gz", tmp_path / "x.npz", "--normalise").returncode == 0


def test_jobs_show_is_pretty_on_a_terminal_and_one_line_for_scripts(tmp_path):
    from db.engine import open_database, transaction
    from pipeline.jobs import create_job

    storage = tmp_path / "node"
    factory = open_database(storage / "rtprop.sqlite")
    with transaction(factory) as session:
        job, _ = create_job(session, rtstruct_uid="1.2.3.4", study_uid="1.2.3", calling_ae="TPS")
        job_id = job.id
    factory.kw["bind"].dispose()
    piped = run("jobs", "show", job_id, "--storage", storage)
    scripted = run("jobs", "show", job_id, "--json", "--storage", storage)
    assert piped.returncode == scripted.returncode == 0
    for out in (piped.stdout, scripted.stdout):
        assert len(out.strip().splitlines()) == 1 and json.loads(out)["job"]["id"] == job_id
    primary, replica = pty.openpty()  # a terminal
    proc = subprocess.Popen([RTPROP, "jobs", "show", str(job_id), "--storage", str(storage)], stdout=replica,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=str(REPO))
    os.close(replica)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(60)
    os.close(primary)
    shown = b"".join(chunks).decode().replace("\r\n", "\n")
    assert proc.returncode == 0 and len(shown.strip().splitlines()) > 10
    assert json.loads(shown)["job"]["id"] == job_id and "destination" in json.loads(shown)["job"]


def test_the_demo_starts_with_its_result_not_a_warning(tmp_path):
    r = run("demo", "--out", tmp_path / "demo", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [line for line in r.stderr.splitlines() if " WARNING " in line], r.stderr
    assert json.loads(r.stdout.strip().splitlines()[0])["metrics"]["dice"] > 0.55


# ------------------------------------------------------------------------------------------- item 5
def test_the_compute_step_takes_and_gives_frozen_typed_objects(tmp_path):
    """What crosses the process boundary (runner.task_for -> compute.compute -> back) was an untyped dict both
    ways: now a frozen ComputeTask in, a ComputeResult or ComputeFailure out, each surviving pickling (the child
    is spawned)."""
    import dataclasses
    import pickle

    from db.schema import Job
    from pipeline.compute import outcome
    from pipeline.compute_types import ComputeFailure, ComputeResult, ComputeTask

    config, factory, made, job, task = claimed_dropin_job(tmp_path, {"pipeline": {"isolate_jobs": False}}, seed=45)
    assert isinstance(task, ComputeTask) and pickle.loads(pickle.dumps(task)) == task
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.out_dir = tmp_path  # type: ignore[misc]
    result = outcome(task)
    assert isinstance(result, ComputeResult) and result.file_check.ok, result
    assert [s.structure for s in result.structures] == ["Tumour"] and result.structures[0].roi == "Tumour_prop"
    assert pydicom.dcmread(result.path).SOPInstanceUID == result.sop_instance_uid
    mask = made["mask"]
    assert result.structures[0].voxels > 0.5 * mask.sum()
    assert pickle.loads(pickle.dumps(result)) == result
    broken = dataclasses.replace(task, series_folder=tmp_path / "gone")
    failure = outcome(broken)
    assert isinstance(failure, ComputeFailure) and failure.kind in ("input", "internal") and "gone" in failure.error
    with factory() as session:
        assert session.get(Job, job.id).state == "running"  # the computation itself never touches the rows
    factory.kw["bind"].dispose()
