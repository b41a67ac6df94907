"""The guard holds what fails, through the node (issue 19, item 3): DCMTK storescu -> `rtprop serve` -> DCMTK
storescp playing the TPS.

A CT phantom with two soft-tissue organs in fat and a small calcification. Three prompt RTSTRUCTs, three
jobs: a tight box around one organ (plausible), a box spanning both organs (the result fills the box's
corners and leaves its centre out) and a click on the calcification (a speck). With
`guard.hold_implausible` on (the default) the two flagged jobs wait for a person and nothing of them
reaches the TPS; with it off they are sent, and each flagged ROI says so in its description: never silently.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node_helpers import NodeProcess, StoreSCP, storescu, wait_for
from phantoms import ball, write_series
from pipeline_helpers import make_prompt_rtstruct

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")

SPACING = (1.2, 1.2, 2.0)  # column, row, slice (mm)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    from converters.series import read_series
    from pipeline.prompts import box_from_slice

    root = tmp_path_factory.mktemp("guardcase")
    rng = np.random.default_rng(3)
    shape = (12, 64, 64)
    organ, other = ball(shape, (6, 20, 20), (4.5, 8, 8)), ball(shape, (6, 44, 44), (4.5, 8, 8))
    image = np.full(shape, -90.0)
    image[organ | other] = 45.0
    image[5:8, 52:54, 14:16] = 700.0  # a calcification, 2 x 2 pixels
    write_series(root / "image", (image + rng.normal(0, 8, shape)).astype(np.float32), spacing=SPACING,
                 patient_id="GUARD01")
    volume = read_series(root / "image")
    good, both = box_from_slice(organ[6], 6), box_from_slice((organ | other)[6], 6)
    prompts = {
        "good": make_prompt_rtstruct(volume, root / "RS_good.dcm", boxes=[("Organ", 6, (good.x0, good.y0, good.x1, good.y1))]),
        "both": make_prompt_rtstruct(volume, root / "RS_both.dcm", boxes=[("Organs", 6, (both.x0, both.y0, both.x1, both.y1))]),
        "speck": make_prompt_rtstruct(volume, root / "RS_speck.dcm", points=[("Calc+", 6, [(14.0, 52.0)])]),
    }
    return {"images": sorted((root / "image").iterdir()), "prompts": prompts}


def run_node(tmp_path: Path, case: dict, *, hold: bool) -> tuple[dict[str, tuple], list[Path]]:
    """Send the series and the three prompts; return {structure: (state, waiting_for, result_path)} once
    every job rests, and what the TPS received."""
    config = {"node": {"series_quiet_period_s": 1.0, "poll_interval_s": 0.2, "send_backoff_s": 0.5},
              "pipeline": {"poll_interval_s": 0.3, "heartbeat_interval_s": 1.0},
              "storage": {"fsync": False}, "guard": {"hold_implausible": hold}}
    with StoreSCP(tmp_path) as tps:
        with NodeProcess(tmp_path / "node", config=config, destination=f"TPS@127.0.0.1:{tps.port}") as node:
            storescu(node.port, case["images"] + list(case["prompts"].values()), calling_ae="ECLIPSE")
            done = ("sent", "awaiting_review", "failed", "dead-letter")
            wait_for(lambda: len(node.query("SELECT id FROM jobs WHERE state IN (%s)" % ",".join("?" * len(done)),
                                            done)) == 3, 240, 0.5, what="the three jobs to rest")
            wait_for(lambda: len(tps.files()) >= sum(s == "sent" for s, in node.query("SELECT state FROM jobs")),
                     30, what="the TPS to store what was sent")
            rows = node.query("SELECT prompts, state, waiting_for, result_path FROM jobs")
            received = tps.files()
    import json

    jobs = {json.loads(p)[0]["structure"]: (state, waiting, path) for p, state, waiting, path in rows}
    return jobs, received


def test_implausible_box_and_click_results_are_held_and_nothing_of_them_is_sent(tmp_path, case):
    jobs, received = run_node(tmp_path, case, hold=True)
    assert jobs["Organ"][0] == "sent" and jobs["Organ"][1] == ""
    for structure, reason in (("Organs", "leaves the box's centre out"), ("Calc", "a speck")):
        state, waiting, _ = jobs[structure]
        assert state == "awaiting_review", (structure, jobs)
        assert waiting.startswith("held, the result looks implausible") and reason in waiting, waiting
    assert len(received) == 1  # only the plausible result reached the TPS
    assert pydicom.dcmread(received[0]).StructureSetROISequence[0].ROIName.startswith("Organ")


def test_with_holding_off_a_flagged_result_is_sent_saying_so_never_silently(tmp_path, case):
    jobs, received = run_node(tmp_path, case, hold=False)
    assert {s for s, *_ in jobs.values()} == {"sent"} and len(received) == 3
    descriptions = {}
    for path in received:
        roi = pydicom.dcmread(path).StructureSetROISequence[0]
        descriptions[str(roi.ROIName)] = str(roi.get("ROIDescription", ""))
    plausible = [name for name in descriptions if name.startswith("Organ_")]
    assert len(plausible) == 1 and not descriptions[plausible[0]].startswith("CHECK: "), descriptions
    assert all(text.startswith("CHECK: ") for name, text in descriptions.items() if name != plausible[0]), descriptions
