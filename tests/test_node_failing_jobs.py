"""A job that must fail never stalls the node (issue 10, defect 1).

Real `rtprop serve`, DCMTK storescu and storescp. A first case is run to get a real result; then
a job is held in every failing path of discovery at once: the node's own result sent back in (the
TPS re-exports the whole structure set), a series with a gap, a prompt whose images never come, a
prompt that cannot be read, and a prompt whose series is ambiguous. While they sit there, a second
normal case must still come back, its C-STORE answered as fast as the first one's, and every failing
job must end with its reason, exactly once, not be retried on every pass. Today's code held the
write lock while `_fail()` waited for it: 48-57 s per C-STORE and no result at all.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node_helpers import VENV_BIN, NodeProcess, StoreSCP, storescu, wait_for
from pipeline_helpers import make_prompt_rtstruct, synthetic_case

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")

CONFIG = {"node": {"series_quiet_period_s": 0.5, "poll_interval_s": 0.2, "send_backoff_s": 0.5,
                   "series_gap_timeout_s": 2.0},
          "pipeline": {"poll_interval_s": 0.2, "series_wait_s": 2.0, "heartbeat_interval_s": 1.0},
          "storage": {"fsync": False}}


def _send_timed(port: int, files: list[Path]) -> float:
    t0 = time.monotonic()
    storescu(port, files, calling_ae="TPS")
    return time.monotonic() - t0


def _result_for(node: NodeProcess, tps: StoreSCP, before: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    wait_for(lambda: len(tps.files()) > before, timeout_s, 0.2, what="the result at the TPS")
    return time.monotonic() - t0


def _case_files(folder: Path) -> tuple[list[Path], Path]:
    return sorted(folder.glob("IMG*.dcm")), folder / "RS_prompt.dcm"


def test_failing_jobs_in_every_path_leave_the_node_serving(tmp_path):
    first = tmp_path / "first"
    second = tmp_path / "second"
    synthetic_case(first, seed=1)
    synthetic_case(second, seed=2)
    # a series with a gap: slice 5 of 12 never sent
    gap = tmp_path / "gap"
    synthetic_case(gap, seed=3)
    gap_images, gap_prompt = _case_files(gap)
    gap_images = gap_images[:5] + gap_images[6:]
    # a prompt whose images never arrive
    orphan = tmp_path / "orphan"
    synthetic_case(orphan, seed=4)
    orphan_prompt = orphan / "RS_prompt.dcm"
    # a prompt that will be unreadable on the node's disk (its archived file damaged after it was stored)
    broken = tmp_path / "broken"
    synthetic_case(broken, seed=5)
    # a prompt whose Frame of Reference holds two CT series, neither referenced by its instances
    amb = tmp_path / "amb"
    case = synthetic_case(amb, seed=6)
    amb_images, _ = _case_files(amb)
    twin = tmp_path / "twin"
    twin.mkdir()
    twin_uid = generate_uid()
    for i, path in enumerate(amb_images):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = twin_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(twin / f"T{i:03d}.dcm")
    amb_prompt = make_prompt_rtstruct(case["volume"], amb / "RS_amb.dcm", boxes=[("Tumour", 6, (8, 8, 16, 16))],
                                      reference_images=False)

    with StoreSCP(tmp_path / "tps") as tps, NodeProcess(tmp_path / "node", config=CONFIG,
                                                        destination=f"TPS@127.0.0.1:{tps.port}") as node:
        images, prompt = _case_files(first)
        store_first = _send_timed(node.port, images + [prompt])
        result_first = _result_for(node, tps, 0, 120)
        own_result = tps.files()[0]

        # every failing path at once
        storescu(node.port, [own_result], calling_ae="TPS")
        storescu(node.port, gap_images + [gap_prompt], calling_ae="TPS")
        storescu(node.port, [orphan_prompt], calling_ae="TPS")
        storescu(node.port, _case_files(broken)[0] + [broken / "RS_prompt.dcm"], calling_ae="TPS")
        broken_uid = str(pydicom.dcmread(broken / "RS_prompt.dcm").SOPInstanceUID)
        archived = Path(node.query("SELECT path FROM instances WHERE sop_instance_uid=?", (broken_uid,))[0][0])
        archived.write_bytes(b"\0" * 64)  # the disk lost it before discovery read it
        storescu(node.port, amb_images + list(twin.iterdir()) + [amb_prompt], calling_ae="TPS")
        time.sleep(4.0)  # past series_wait_s and series_gap_timeout_s: every failing path is being taken

        images, prompt = _case_files(second)
        store_second = _send_timed(node.port, images + [prompt])
        result_second = _result_for(node, tps, 1, 120)

        wait_for(lambda: node.query("SELECT count(*) FROM jobs WHERE state IN ('received', 'queued', 'running', "
                                    "'validated', 'sending')")[0][0] == 0, 30, 0.3, what="every job to end")
        jobs = node.query("SELECT state, error FROM jobs ORDER BY id")
        exported = subprocess.run([str(VENV_BIN / "rtprop"), "audit", "export", "--storage", str(node.storage),
                                   "--patient-id", "SYN001"], capture_output=True, text=True, timeout=60)
        ends = node.query("SELECT job_id, count(*) FROM audit WHERE event IN ('job.failed', 'job.ignored') "
                          "GROUP BY job_id")
        t_stop = time.monotonic()
    stopped_s = time.monotonic() - t_stop
    print(f"C-STORE first {store_first:.2f} s, second {store_second:.2f} s; result first {result_first:.1f} s, "
          f"second {result_second:.1f} s; stop {stopped_s:.1f} s")
    states = [s for s, _ in jobs]
    assert states.count("sent") == 2, jobs
    assert states.count("ignored") == 1, jobs  # our own result: never a prompt
    errors = " | ".join(e for s, e in jobs if s == "failed")
    assert states.count("failed") == 4, jobs
    assert "incomplete" in errors or "missing" in errors, errors  # the gap
    assert "no image series" in errors, errors  # the orphan, after series_wait_s
    assert "unreadable" in errors, errors  # the damaged prompt
    assert "ambiguous" in errors and twin_uid in errors, errors  # named, not guessed
    assert all(n == 1 for _, n in ends), ends  # each failing job ended once, not on every pass
    # the node kept serving in normal time: the second case no slower than a few times the first
    # (the stall made every C-STORE of a 12-slice series take tens of seconds)
    assert store_second < max(3 * store_first, 5.0), (store_first, store_second)
    assert result_second < max(3 * result_first, 20.0), (result_first, result_second)
    assert stopped_s < 20
    # every row of the first patient, not only its received instances: its job and its send too
    events = {json.loads(line)["event"] for line in exported.stdout.splitlines()}
    assert {"instances.received", "series.complete", "job.created", "job.sent", "send.queued", "send.sent"} <= events
    assert "-> sent" in node.log()  # the admin sees job state changes without -v
