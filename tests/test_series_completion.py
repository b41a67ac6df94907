"""Issue 23: a series is complete the moment its images say so. A prompt RTSTRUCT that lists every image
of its series completes that series as soon as all of them are in, whichever came first and however many
associations carried them; a prompt listing only its contoured slices leaves it to the quiet period (or
the association's release) and the job says so. Real `rtprop serve`, DCMTK storescu over loopback."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from node_helpers import NodeProcess, StoreSCP, storescu, wait_for
from pipeline_helpers import synthetic_case

QUIET_S = 60.0  # far beyond every wait below: a series completed in seconds was completed by its prompt
BASE = {"node": {"series_quiet_period_s": QUIET_S, "poll_interval_s": 0.2},
        "pipeline": {"poll_interval_s": 0.2}, "propagation": {"backend": "classic"},
        "storage": {"min_free_mb": 10, "fsync": False}}


def _case(tmp_path: Path, **kw) -> tuple[list[Path], Path]:
    """A 12-slice phantom CT (slices in position order) and its one-slice box prompt."""
    folder = tmp_path / "case"
    synthetic_case(folder, seed=3, **kw)
    images = sorted((p for p in folder.glob("*.dcm") if p.name != "RS_prompt.dcm"),
                    key=lambda p: float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    return images, folder / "RS_prompt.dcm"


def _series(node: NodeProcess, modality: str = "CT") -> tuple[str, str] | None:
    rows = node.query("select state, completed_by from series where modality = ?", (modality,))
    return rows[0] if rows else None


def _complete(node: NodeProcess, timeout_s: float) -> tuple[str, str]:
    return wait_for(lambda: (s := _series(node)) and s[0] == "complete" and s, timeout_s, what="the CT series complete")


def _events(node: NodeProcess, event: str) -> list[dict]:
    return [json.loads(d) for (d,) in node.query("select details from audit where event = ? order by id", (event,))]


def test_a_series_split_over_two_associations_completes_when_the_prompt_lists_all_of_it(tmp_path: Path) -> None:
    images, prompt = _case(tmp_path)
    with NodeProcess(tmp_path / "n", config=BASE) as node:
        storescu(node.port, images[:6])
        time.sleep(2.0)  # the first half is contiguous, but nothing says the series is all here
        assert _series(node) == ("receiving", "")
        storescu(node.port, [*images[6:], prompt])
        t0 = time.monotonic()
        assert _complete(node, 10) == ("complete", "prompt")
        assert time.monotonic() - t0 < QUIET_S / 4
        done = _events(node, "series.complete")
        assert [d["completed_by"] for d in done if d["modality"] == "CT"] == ["prompt"]
        # the job's timeline says which rule completed its series
        queued = wait_for(lambda: _events(node, "job.queued"), 20, what="the job queued")
        assert queued[0]["series_completed_by"] == "prompt" and "lists every image" in queued[0]["series_rule"]


def test_a_prompt_sent_before_its_images_completes_the_series_when_the_last_one_arrives(tmp_path: Path) -> None:
    images, prompt = _case(tmp_path)
    with NodeProcess(tmp_path / "n", config=BASE) as node:
        storescu(node.port, [prompt])
        waiting = wait_for(lambda: node.query("select waiting_for from jobs where state = 'received' "
                                              "and waiting_for != ''"), 20, what="the job waiting")
        assert "image series" in waiting[0][0]
        storescu(node.port, images[::2])  # every other slice first: a gap, nothing completes
        time.sleep(2.0)
        assert _series(node) == ("receiving", "")
        wait_for(lambda: "lists all 12" in (node.query("select waiting_for from jobs")[0][0]), 10,
                 what="the job saying what completes its series")
        storescu(node.port, images[1::2])
        assert _complete(node, 10) == ("complete", "prompt")
        wait_for(lambda: _events(node, "job.queued"), 20, what="the job queued")


def test_a_prompt_listing_only_its_contoured_slice_leaves_it_to_the_quiet_period_and_says_so(tmp_path: Path) -> None:
    images, prompt = _case(tmp_path, list_only_contoured=True)
    config = {**BASE, "node": {**BASE["node"], "series_quiet_period_s": 4.0}}
    with NodeProcess(tmp_path / "n", config=config) as node:
        storescu(node.port, [*images, prompt])
        last = time.monotonic()
        time.sleep(1.5)
        assert _series(node) == ("receiving", "")  # its listing cannot say the series is all here
        waiting = wait_for(lambda: node.query("select waiting_for from jobs where waiting_for != ''"), 10,
                           what="the job waiting")[0][0]
        assert "lists only its contoured slices" in waiting and "series_quiet_period_s=4" in waiting
        assert _complete(node, 15) == ("complete", "quiet")
        assert time.monotonic() - last >= 4.0
        queued = wait_for(lambda: _events(node, "job.queued"), 20, what="the job queued")
        assert queued[0]["series_completed_by"] == "quiet"


def test_a_prompt_listing_only_its_slice_sent_first_is_not_completed_by_that_slice_alone(tmp_path: Path) -> None:
    """The one listed slice arriving first matches the listing exactly: it must not make a 1-slice series."""
    images, prompt = _case(tmp_path, list_only_contoured=True)
    with NodeProcess(tmp_path / "n", config=BASE) as node:
        storescu(node.port, [prompt])
        listed = dcmread(prompt).ROIContourSequence[0].ContourSequence[0].ContourImageSequence[0]
        first = next(p for p in images
                     if dcmread(p, stop_before_pixels=True).SOPInstanceUID == listed.ReferencedSOPInstanceUID)
        storescu(node.port, [first])
        time.sleep(2.5)  # a dozen completion passes
        assert _series(node) == ("receiving", "")


def _extra_slice(images: list[Path], out: Path) -> Path:
    """One more slice after the last one: same series, next position, a new SOP Instance UID."""
    ds = dcmread(images[-1])
    before = dcmread(images[-2], stop_before_pixels=True)
    step = float(ds.ImagePositionPatient[2]) - float(before.ImagePositionPatient[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                               round(float(ds.ImagePositionPatient[2]) + step, 3)]
    ds.InstanceNumber = int(ds.InstanceNumber) + len(images)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_images_arriving_after_the_job_started_reopen_the_series_without_a_second_result(tmp_path: Path) -> None:
    images, prompt = _case(tmp_path)
    tps = StoreSCP(tmp_path / "tps").start()
    config = {**BASE, "node": {**BASE["node"], "series_quiet_period_s": 3.0,
                               "destinations": {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.port}},
                               "default_destination": "tps"}}
    try:
        with NodeProcess(tmp_path / "n", config=config) as node:
            storescu(node.port, [*images, prompt])
            assert _complete(node, 10) == ("complete", "prompt")
            wait_for(lambda: node.query("select state from jobs where state in ('running', 'validated', 'sending', "
                                        "'sent')"), 30, 0.05, what="the job started")
            storescu(node.port, [_extra_slice(images, tmp_path / "extra.dcm")])
            wait_for(lambda: node.query("select state from jobs")[0][0] == "sent", 60, what="the job sent")
            reopened = wait_for(lambda: _events(node, "series.reopened"), 10, what="the series reopened")
            assert reopened[0]["previous_state"] == "complete"
            # 13 images now, the prompt lists 12: its listing no longer says "all here", the quiet period does
            assert _complete(node, 15) == ("complete", "quiet")
            time.sleep(2.0)  # housekeeping passes: nothing more happens
            assert node.query("select count(*) from jobs")[0][0] == 1
            assert node.query("select count(*) from sends where state = 'sent'")[0][0] == 1
        assert len(tps.files()) == 1 and tps.stores_received() == 1
    finally:
        tps.stop()
