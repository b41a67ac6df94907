"""A warm worker (issue 23 item 2): a job's compute process is started and imported before the job arrives and
reused job after job; a lost job's process is killed and replaced; a classic job never loads torch; finding a
job's prompts reads no pixel data.

Real processes throughout: `rtprop serve` over DICOM (DCMTK storescu, storescp as the TPS), the spawned compute
process seen through /proc, real SQLite and real files.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pydicom
import pytest

from node_helpers import NodeProcess, StoreSCP, storescu, wait_for
from pipeline_helpers import claimed_dropin_job, synthetic_case

DCMTK = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")


def compute_processes(parent_pid: int) -> list[int]:
    """Live multiprocessing-spawned children of `parent_pid` (its compute processes; not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent_pid and state != "Z" and "spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def mapped(pid: int, library: str) -> bool:
    """Is a shared library whose path contains `library` loaded in process `pid`?"""
    return library in Path(f"/proc/{pid}/maps").read_text()


def propagated(node: NodeProcess) -> list[dict]:
    """The `process` of each job.propagated audit row, in order: which compute process made it, its nth job."""
    return [json.loads(d)["process"] for (d,) in node.query(
        "SELECT details FROM audit WHERE event = 'job.propagated' ORDER BY id")]


@DCMTK
def test_a_warm_node_runs_every_job_in_the_process_it_started_ahead_and_never_loads_torch(tmp_path: Path) -> None:
    """The node's compute process exists, with the weight-free stack imported, before anything is sent; both jobs
    run in it (the second without a process start or an import); torch is never loaded in it."""
    cases = [tmp_path / f"case{i}" for i in range(2)]
    for i, case in enumerate(cases):
        synthetic_case(case, seed=60 + i, size=32, slices=16)  # the prompt lists every image: complete at once
    with StoreSCP(tmp_path / "tps") as tps:
        node = NodeProcess(tmp_path / "node", config={"storage": {"fsync": False}},
                           destination=f"TPS@127.0.0.1:{tps.port}").start()
        try:
            pids = wait_for(lambda: compute_processes(node.proc.pid), 60, 0.1, what="a compute process before any job")
            assert len(pids) == 1
            child = pids[0]
            # imported ahead: the classic propagator's libraries are in it before a job exists
            wait_for(lambda: mapped(child, "SimpleITK") and mapped(child, "cv2"), 120, 0.2,
                     what="the weight-free stack imported in the compute process")
            assert node.query("SELECT count(*) FROM jobs")[0][0] == 0
            for n, case in enumerate(cases, start=1):
                storescu(node.port, sorted(case.iterdir()), calling_ae="TPS")
                wait_for(lambda: len(tps.files()) == n, 120, 0.1, what=f"result {n} at the TPS")
            processes = propagated(node)
            assert compute_processes(node.proc.pid) == [child]  # still there, waiting for the next job
            assert not mapped(child, "libtorch")  # the weight-free backend never loads torch
        finally:
            node.stop()
    assert processes == [{"pid": child, "job_in_process": 1}, {"pid": child, "job_in_process": 2}]


@DCMTK
def test_a_compute_process_killed_mid_job_is_replaced_and_the_job_retried_once(tmp_path: Path) -> None:
    """SIGKILL of the compute process while it computes (what the kernel's OOM killer does): the worker lives
    on, the attempt is recorded as lost, a new process is started, the job runs again in it and its result
    reaches the TPS once; the new process stays for the next job."""
    case = tmp_path / "case"
    synthetic_case(case, seed=70, size=256, slices=48)  # a few seconds of propagation: time to kill it mid-job
    with StoreSCP(tmp_path / "tps") as tps:
        node = NodeProcess(tmp_path / "node", config={"storage": {"fsync": False},
                                                      "pipeline": {"poll_interval_s": 0.2}},
                           destination=f"TPS@127.0.0.1:{tps.port}").start()
        try:
            first = wait_for(lambda: compute_processes(node.proc.pid), 60, 0.1, what="the compute process")[0]
            storescu(node.port, sorted(case.iterdir()), calling_ae="TPS")
            wait_for(lambda: node.query("SELECT id FROM jobs WHERE state = 'running'"), 120, 0.02,
                     what="the job running")
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: len(tps.files()) == 1, 240, 0.2, what="the retried job's result at the TPS")
            wait_for(lambda: node.query("SELECT state FROM jobs") == [("sent",)], 60, 0.1, what="the job sent")
            state, attempts = node.query("SELECT state, attempts FROM jobs")[0]
            events = [e for (e,) in node.query("SELECT event FROM audit WHERE job_id IS NOT NULL ORDER BY id")]
            lost = node.query("SELECT details FROM audit WHERE event = 'job.recovered'")
            processes = propagated(node)
            now = compute_processes(node.proc.pid)
            assert node.proc.poll() is None  # the worker (the node) was never taken down
        finally:
            node.stop()
    assert (state, attempts) == ("sent", 2)
    assert events.count("job.recovered") == 1 and events.count("job.sent") == 1 and tps.stores_received() == 1
    assert "job process" in lost[0][0]  # "job process died (exit code -9 ...)" or "exited ... without a result"
    second = processes[0]["pid"]
    assert second != first and processes == [{"pid": second, "job_in_process": 1}]
    assert now == [second]  # the replacement waits, warm, for the next job


# --------------------------------------------------------------------------- the compute process itself
def _claimed_task(tmp_path: Path, seed: int = 80):
    """A real job's ComputeTask: a synthetic case taken in through the drop-in, discovered, claimed."""
    config, factory, _, _, task = claimed_dropin_job(tmp_path, {}, seed=seed, size=64, slices=24)
    factory.kw["bind"].dispose()
    return config, task


def test_a_lost_job_kills_its_process_and_a_warm_replacement_takes_the_next_jobs(tmp_path: Path) -> None:
    """Timeout and a claim taken over each kill the process computing and start another at once; a job that
    comes back is computed in the live process, the next one in the same process; a worker stopping hands
    its job back and starts nothing."""
    from pipeline.compute import ComputeChild, JobLost
    from pipeline.compute_types import ComputeResult

    config, task = _claimed_task(tmp_path)
    child = ComputeChild(config).start()
    try:
        first = child.pid
        with pytest.raises(JobLost) as lost:
            child.run(task, timeout_s=0.0, tick_s=0.01, tick=lambda: True)
        assert lost.value.timeout
        wait_for(lambda: not Path(f"/proc/{first}").exists() or "Z" in Path(f"/proc/{first}/stat").read_text()
                 .rsplit(")", 1)[1].split()[0], 10, 0.05, what="the timed-out process gone")
        second = child.pid
        assert second is not None and second != first  # replaced before the next job is asked for

        with pytest.raises(JobLost) as lost:
            child.run(task, timeout_s=600, tick_s=0.01, tick=lambda: False)
        assert lost.value.claim_lost
        third = child.pid
        assert third not in (None, first, second)

        results = [child.run(task, timeout_s=600, tick_s=0.2, tick=lambda: True) for _ in range(2)]
        assert all(isinstance(r, ComputeResult) and r.file_check.ok for r in results), results
        assert [(r.pid, r.job_in_process) for r in results] == [(third, 1), (third, 2)]
        assert pydicom.dcmread(results[1].path).SOPInstanceUID == results[0].sop_instance_uid  # the same result
        assert not mapped(third, "libtorch")

        stop = threading.Event()
        stop.set()
        with pytest.raises(JobLost) as lost:
            child.run(task, timeout_s=600, tick_s=0.01, tick=lambda: True, stop=stop)
        assert lost.value.handed_back and child.pid is None  # stopping: nothing new is started
    finally:
        child.close()


# --------------------------------------------------------------------------- discovery reads headers only
def test_finding_the_prompts_reads_no_pixel_data_and_the_job_names_a_damaged_slice(tmp_path: Path) -> None:
    """A slice whose pixel data is cut short on disk after it was received (its header intact): discovery, which
    needs only the geometry, queues the job; the job's one read of the pixels fails it as the input's fault,
    naming the file."""
    from sqlalchemy import select

    from config.load import load_config, resolve_storage
    from db.engine import open_database
    from db.schema import Instance, Job
    from dicom_node.completion import CompletionChecker
    from dicom_node.storage import Received, Store
    from pipeline.discovery import discover
    from pipeline.worker import Worker

    case = tmp_path / "case"
    synthetic_case(case, seed=90)
    damaged_uid = str(pydicom.dcmread(sorted(case.glob("IMG*"))[5], stop_before_pixels=True).SOPInstanceUID)
    config = resolve_storage(load_config(None, environ={}, overrides={
        "storage": {"root": str(tmp_path / "s"), "fsync": False}, "node": {"series_quiet_period_s": 0},
        "pipeline": {"isolate_jobs": False}}))
    factory = open_database(config.storage.database)
    store = Store(config.storage, factory, fsync=False)
    for path in sorted(case.glob("IMG*")):
        assert store.ingest(path.read_bytes(), Received(calling_ae="TPS")).status == 0
    with factory() as session:
        stored = Path(session.execute(select(Instance.path).where(Instance.sop_instance_uid == damaged_uid))
                      .scalar_one())
    ds = pydicom.dcmread(stored)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # a well-formed file whose image is half missing
    ds.save_as(stored)
    assert store.ingest((case / "RS_prompt.dcm").read_bytes(), Received(calling_ae="TPS")).status == 0
    CompletionChecker(factory, config).check()
    discover(factory, config)
    with factory() as session:
        job = session.execute(select(Job)).scalar_one()
    assert job.state == "queued", job.error  # the old discovery read every pixel and failed it here
    Worker(factory, config).drain(120)
    with factory() as session:
        job = session.get(Job, job.id)
    factory.kw["bind"].dispose()
    assert job.state == "failed" and job.attempts == 1
    assert stored.name in job.error and "pixel data unreadable" in job.error, job.error


@DCMTK
def test_a_result_goes_out_without_waiting_for_any_poll(tmp_path: Path) -> None:
    """Each hand-over wakes the next step: the association's release the completion check, the completed series
    the workers, the committed send the sender. With every poll set to a minute, the result of a prompt listing
    all its images still reaches the TPS in seconds (polling alone takes up to three minutes here)."""
    import time

    case = tmp_path / "case"
    synthetic_case(case, seed=95, size=32, slices=16)
    with StoreSCP(tmp_path / "tps") as tps:
        node = NodeProcess(tmp_path / "node", config={"storage": {"fsync": False}, "node": {"poll_interval_s": 60},
                                                      "pipeline": {"poll_interval_s": 60}},
                           destination=f"TPS@127.0.0.1:{tps.port}").start()
        try:
            time.sleep(3)  # the start-up passes of the completion check, the worker and the sender are over
            storescu(node.port, sorted(case.iterdir()), calling_ae="TPS")
            returned = time.monotonic()
            wait_for(lambda: len(tps.files()) == 1, 240, 0.05, what="the result at the TPS")
            seconds = time.monotonic() - returned
            completed_by = node.query("SELECT completed_by FROM series WHERE modality = 'CT'")
        finally:
            node.stop()
    assert completed_by == [("prompt",)]
    assert seconds < 30, f"{seconds:.1f} s: a step waited for its poll"
