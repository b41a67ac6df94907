"""A reviewer's corrections through the JSON API, against the real server (`rtprop web` on loopback), a real
SQLite database and real jobs: synthetic phantom cases dropped in the inbox, propagated by the real worker
and held for review. Each kind of correction, the refusals (400 naming what is wrong), the roles, undo,
two reviewers at once, and an accept that sends the corrected revision.

What a correction must do is checked on the RTSTRUCT the API serves (`GET /api/v1/jobs/{id}/result`),
read back on the series: a positive click's voxel is inside the new contour on its slice, a negative
click's is outside, a box holds the contour on its slice, an outline is the contour on its slice, an
extent bounds the slices.
"""
from __future__ import annotations

import io
import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from pipeline_helpers import synthetic_case
from web_helpers import Client, WebProcess, add_user, run_dropped_cases, token

USERS = {"rhea": "reviewer", "ruth": "reviewer", "vic": "viewer"}
CASES = ("kinds", "refusals", "race", "roles")


def node_config(root: Path) -> dict:
    return {"storage": {"root": str(root), "fsync": False}, "node": {"series_quiet_period_s": 0},
            "pipeline": {"poll_interval_s": 0.1, "isolate_jobs": False}, "review": {"before_send": True},
            "dropin": {"stable_s": 0}}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from config.load import load_config, resolve_storage

    root = tmp_path_factory.mktemp("corrections")
    storage = root / "storage"
    cases = {}
    for i, name in enumerate(CASES):
        cases[name] = synthetic_case(root / "cases" / name, seed=10 + i)
    factory, _ = run_dropped_cases(resolve_storage(load_config(None, overrides=node_config(storage))),
                                   [root / "cases" / name for name in CASES])
    factory.kw["bind"].dispose()
    for name, role in USERS.items():
        add_user(storage, name, role, f"{name[::-1]}-pass-123")  # not containing the name (web/auth.py)
    config = root / "web.yaml"
    config.write_text(yaml.safe_dump(node_config(storage)))
    with WebProcess(root, storage, config) as web:
        tokens = {name: token(storage, name) for name in USERS}
        with sqlite3.connect(storage / "rtprop.sqlite") as con:
            jobs = dict(con.execute("SELECT dropin_case, id FROM jobs").fetchall())
        yield {"web": web, "storage": storage, "db": storage / "rtprop.sqlite", "tokens": tokens, "jobs": jobs,
               "cases": cases}


def query(site, sql: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(f"file:{site['db']}?mode=ro", uri=True, timeout=30) as con:
        return con.execute(sql, args).fetchall()


def api(site, user: str, method: str, path: str, body=None) -> tuple[int, dict, bytes]:
    return Client(site["web"].url).request(method, path, body=body,
                                           headers={"Authorization": f"Bearer {site['tokens'][user]}"})


def post(site, user: str, job_id: int, body, path: str = "corrections") -> tuple[int, dict]:
    status, _, raw = api(site, user, "POST", f"/api/v1/jobs/{job_id}/{path}", body)
    return status, json.loads(raw)


def result(site, job_id: int, user: str = "rhea"):
    """(dataset, mask of its one ROI on the case's series) of GET .../result."""
    from converters.rtstruct_read import read_rtstruct

    status, headers, raw = api(site, user, "GET", f"/api/v1/jobs/{job_id}/result")
    assert status == 200 and headers["content-type"] == "application/dicom", (status, raw[:200])
    ds = pydicom.dcmread(io.BytesIO(raw))
    path = site["storage"] / f"result-{ds.SOPInstanceUID}.dcm"
    path.write_bytes(raw)
    case = next(c for c in site["cases"].values() if c["volume"].study_instance_uid == ds.StudyInstanceUID)
    return ds, read_rtstruct(path, case["volume"]).rois[0].mask


def roi_of(site, job_id: int) -> str:
    return query(site, "SELECT json_extract(prompts, '$[0].structure') FROM jobs WHERE id=?", (job_id,))[0][0] + "_prop"


def revisions(site, job_id: int) -> int:
    return query(site, "SELECT count(*) FROM revisions WHERE job_id=?", (job_id,))[0][0]


def test_every_kind_of_correction_makes_a_revision_that_does_what_it_says(site):
    job = site["jobs"]["kinds"]
    roi = roi_of(site, job)
    _, before = result(site, job)
    on = np.flatnonzero(before.any(axis=(1, 2)))
    middle = int(on[len(on) // 2])

    ys, xs = np.nonzero(before[middle])  # a negative click on the contour's rightmost voxel
    x, y = int(xs.max()), int(ys[xs.argmax()])
    status, out = post(site, "rhea", job, {"roi": roi, "kind": "point", "slice": middle, "x": x, "y": y,
                                           "positive": False})
    assert status == 201, out
    assert out["revision"] == 1 and out["roi"] == roi and 0 <= out["confidence"] <= 1
    ds, mask = result(site, job)
    assert not mask[middle, y, x] and mask[middle].any()
    assert out["slices"] == [int(v) for v in np.flatnonzero(mask.any(axis=(1, 2)))[[0, -1]]]

    status, out = post(site, "rhea", job, {"roi": roi, "kind": "point", "slice": middle, "x": x, "y": y,
                                           "positive": True})
    assert status == 201 and out["revision"] == 2, out
    _, mask = result(site, job)
    assert mask[middle, y, x]
    state = json.loads(api(site, "rhea", "GET", f"/jobs/{job}/review/state.json")[2])
    assert state["rois"][0]["items"] == [{"kind": "point", "slice": middle, "x": x, "y": y, "positive": True}]

    box_slice = int(on[0]) + 1  # a small box off centre: the contour on that slice stays inside it
    box = {"x0": 8, "y0": 8, "x1": 13, "y1": 13}
    status, out = post(site, "rhea", job, {"roi": roi, "kind": "box", "slice": box_slice, **box})
    assert status == 201 and out["revision"] == 3, out
    _, mask = result(site, job)
    ys, xs = np.nonzero(mask[box_slice])
    assert len(xs) and xs.min() >= 7 and xs.max() <= 14 and ys.min() >= 7 and ys.max() <= 14

    square = [[9, 9], [15, 9], [15, 15], [9, 15]]  # an outline: the contour on its slice is that square
    status, out = post(site, "rhea", job, {"roi": roi, "kind": "outline", "slice": middle + 1, "points": square})
    assert status == 201 and out["revision"] == 4, out
    _, mask = result(site, job)
    drawn = np.zeros_like(mask[middle + 1])
    drawn[9:16, 9:16] = True
    assert (mask[middle + 1] == drawn).mean() > 0.98

    first, last = box_slice, int(on[-1]) - 1
    status, out = post(site, "rhea", job, {"roi": roi, "kind": "extent", "first": first, "last": last})
    assert status == 201 and out["revision"] == 5, out
    ds, mask = result(site, job)
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    assert slices[0] >= first and slices[-1] <= last and out["slices"] == [int(slices[0]), int(slices[-1])]
    # the RTSTRUCT says what it holds: a person corrected this ROI, 4 corrections in force (the positive
    # click replaced the negative one on the same voxel)
    item = ds.StructureSetROISequence[0]
    assert item.ROIName == roi and item.ROIGenerationAlgorithm == "SEMIAUTOMATIC"
    assert "4 reviewer corrections" in item.ROIGenerationDescription
    assert "revision 5: 4 reviewer corrections by rhea" in ds.StructureSetDescription
    rows = query(site, "SELECT number, roi, action, user FROM revisions WHERE job_id=? ORDER BY number", (job,))
    assert rows == [(n, roi, "correction", "rhea") for n in range(1, 6)]
    # each correction applied only itself to the revision before (the job's own result, for the first), but
    # the second: it replaced the first (same voxel), so the engine ran the prompts and it in full
    incremental = query(site, "SELECT json_extract(summary, '$.incremental') FROM revisions WHERE job_id=? "
                              "ORDER BY number", (job,))
    assert [bool(v) for v, in incremental] == [True, False, True, True, True]
    events = [(e, json.loads(d)["user"], json.loads(d).get("revision")) for e, d in
              query(site, "SELECT event, details FROM audit WHERE job_id=? AND event='job.correction' ORDER BY id",
                    (job,))]
    assert events == [("job.correction", "rhea", n) for n in range(1, 6)]


def test_undo_goes_back_one_revision_at_a_time_and_then_refuses(site):
    job = site["jobs"]["kinds"]  # after the test above: five revisions, four corrections in force
    roi = roi_of(site, job)
    before = revisions(site, job)
    states = {}
    for n in range(before + 1):
        path = query(site, "SELECT rtstruct_path FROM revisions WHERE job_id=? AND number=?", (job, n))
        states[n] = path[0][0] if path else query(site, "SELECT result_path FROM jobs WHERE id=?", (job,))[0][0]
    status, out = post(site, "rhea", job, {"roi": roi}, "corrections/undo")
    assert status == 201 and out["revision"] == before + 1, out
    ds, mask = result(site, job)
    from converters.rtstruct_read import read_rtstruct

    case = site["cases"]["kinds"]
    wanted = read_rtstruct(states[before - 1], case["volume"]).rois[0].mask
    assert np.array_equal(mask, wanted)  # the state before the last correction, exactly
    assert "3 reviewer corrections" in ds.StructureSetDescription
    for _ in range(4):
        status, out = post(site, "ruth", job, {"roi": roi}, "corrections/undo")
        assert status == 201, out
    ds, mask = result(site, job)
    original = read_rtstruct(states[0], case["volume"]).rois[0].mask
    assert np.array_equal(mask, original)  # every correction undone: the job's own result
    assert ds.StructureSetROISequence[0].ROIGenerationAlgorithm == "AUTOMATIC"
    status, out = post(site, "rhea", job, {"roi": roi}, "corrections/undo")
    assert status == 409 and "no correction to undo" in out["error"]
    status, out = post(site, "rhea", job, {"roi": "Nope"}, "corrections/undo")
    assert status == 400 and "'Nope'" in out["error"] and roi in out["error"]
    undone = [json.loads(d)["user"] for (d,) in query(
        site, "SELECT details FROM audit WHERE job_id=? AND event='job.undo' ORDER BY id", (job,))]
    assert undone == ["rhea"] + ["ruth"] * 4


@pytest.mark.parametrize("body, named", [
    ("not json", "JSON"),
    ([1, 2], "JSON object"),
    ({"kind": "point", "slice": 3, "x": 1, "y": 1}, "roi is missing"),
    ({"roi": "Nope", "kind": "point", "slice": 3, "x": 1, "y": 1}, "'Nope'"),
    ({"kind": "circle", "slice": 3}, 'kind "circle"'),
    ({"kind": "point", "slice": 12, "x": 1, "y": 1}, "slice = 12 is outside the image: slices are 0..11"),
    ({"kind": "point", "slice": 3, "x": 1.5, "y": 1}, "x must be an integer"),
    ({"kind": "point", "slice": 3, "x": 24, "y": 1}, "x = 24 is outside"),
    ({"kind": "point", "slice": 3, "x": 1, "y": 1, "positive": "yes"}, "positive must be true or false"),
    ({"kind": "point", "x": 1, "y": 1}, "slice is missing"),
    ({"kind": "box", "slice": 3, "x0": 9, "y0": 4, "x1": 5, "y1": 9}, "inverted"),
    ({"kind": "box", "slice": 3, "x0": 0, "y0": 0, "x1": 30, "y1": 5}, "x1 = 30 is outside"),
    ({"kind": "box", "slice": 3, "x0": 0, "y0": 0, "x1": 5}, "y1 is missing"),
    ({"kind": "outline", "slice": 3, "points": [[1, 1], [5, 5]]}, "at least 3"),
    ({"kind": "outline", "slice": 3, "points": [[1, 1], [5, 1], [40, 5]]}, "points[2] = [40, 5] is outside"),
    ({"kind": "outline", "slice": 3, "points": [[1, 1], [5, 1], "x"]}, "points[2]"),
    ({"kind": "outline", "slice": 3, "points": [[1.1, 1.1], [1.3, 1.1], [1.2, 1.4]]}, "encloses no pixel"),
    ({"kind": "extent", "first": 8, "last": 4}, "first = 8 > last = 4"),
    ({"kind": "extent", "first": 0, "last": 3}, "leaves out prompted slice"),
    ({"kind": "point", "slice": 3, "x": 1, "y": 1, "revision": "latest"}, "revision must be"),
])
def test_a_bad_correction_is_a_400_naming_what_is_wrong_and_nothing_is_recorded(site, body, named):
    job = site["jobs"]["refusals"]
    if isinstance(body, dict) and "roi" not in body and "roi is missing" not in named:
        body = {"roi": roi_of(site, job), **body}
    headers = {"Authorization": f"Bearer {site['tokens']['rhea']}"}
    data = b"{not json" if body == "not json" else json.dumps(body).encode()
    status, _, raw = _post_raw(site, job, data, headers)
    assert status == 400, raw
    assert named in json.loads(raw)["error"], raw
    assert revisions(site, job) == 0
    if body != "not json":  # (an unparsable body is refused by the router before any handler)
        (details,) = query(site, "SELECT details FROM audit WHERE event='job.correction_refused' ORDER BY id DESC "
                                 "LIMIT 1")[0]
        assert json.loads(details)["user"] == "rhea" and json.loads(details)["status"] == 400


def _post_raw(site, job: int, data: bytes, headers: dict) -> tuple[int, dict, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{site['web'].url}/api/v1/jobs/{job}/corrections", data=data, method="POST",
                                 headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_roles_a_viewer_and_anonymous_cannot_correct_undo_or_download_and_the_page_needs_csrf(site):
    job = site["jobs"]["roles"]
    roi = roi_of(site, job)
    body = {"roi": roi, "kind": "extent", "first": 3, "last": 9}
    anon = Client(site["web"].url)
    for method, path, data in (("POST", "corrections", body), ("POST", "corrections/undo", {"roi": roi}),
                               ("GET", "result", None)):
        assert anon.request(method, f"/api/v1/jobs/{job}/{path}", body=data)[0] == 401
        status, _, raw = api(site, "vic", method, f"/api/v1/jobs/{job}/{path}", data)
        assert status == 403 and b"needs reviewer" in raw
    session = Client(site["web"].url)
    assert session.login("rhea", "aehr-pass-123") == 303
    status, _, raw = session.post(f"/api/v1/jobs/{job}/corrections", body=body)
    assert status == 403 and b"CSRF" in raw  # the page's session needs its CSRF token
    csrf = session.csrf(f"/jobs/{job}/review")
    status, _, raw = session.post(f"/api/v1/jobs/{job}/corrections", body=body, headers={"X-CSRF-Token": csrf})
    assert status == 201, raw
    assert revisions(site, job) == 1
    assert api(site, "rhea", "POST", "/api/v1/jobs/999/corrections", body)[0] == 404


def test_two_reviewers_at_once_one_wins_the_other_is_told_and_sees_the_newer_revision(site):
    job = site["jobs"]["race"]
    roi = roi_of(site, job)
    _, before = result(site, job)
    on = np.flatnonzero(before.any(axis=(1, 2)))
    bodies = {"rhea": {"roi": roi, "kind": "extent", "first": int(on[0]) + 1, "last": int(on[-1]), "revision": 0},
              "ruth": {"roi": roi, "kind": "extent", "first": int(on[0]), "last": int(on[-1]) - 1, "revision": 0}}
    answers: dict[str, tuple[int, dict]] = {}
    start = threading.Barrier(2)

    def correct(user: str) -> None:
        start.wait()
        answers[user] = post(site, user, job, bodies[user])

    threads = [threading.Thread(target=correct, args=(u,)) for u in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(s for s, _ in answers.values())
    assert statuses == [201, 409], answers
    winner = next(u for u, (s, _) in answers.items() if s == 201)
    loser = next(u for u in answers if u != winner)
    told = answers[loser][1]
    assert told["revision"] == 1 and "revision 1" in told["error"]
    assert query(site, "SELECT number, user FROM revisions WHERE job_id=?", (job,)) == [(1, winner)]
    # the one told looks again: the page's state and the result are the winner's revision
    status, _, raw = api(site, loser, "GET", f"/jobs/{job}/review/state.json")
    assert status == 200 and json.loads(raw)["revision"] == 1 and json.loads(raw)["by"] == winner
    _, mask = result(site, job, loser)
    wanted = bodies[winner]
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    assert slices[0] >= wanted["first"] and slices[-1] <= wanted["last"]
    refused = [json.loads(d) for (d,) in query(
        site, "SELECT details FROM audit WHERE job_id=? AND event='job.correction_refused'", (job,))]
    assert [(r["user"], r["status"]) for r in refused] == [(loser, 409)]
    # an accept of the revision no longer on screen is refused too, and nothing is sent
    status, out = post(site, loser, job, {"roi": roi, "decision": "accept", "revision": 0}, "review")
    assert status == 409 and out["revision"] == 1
    assert query(site, "SELECT count(*) FROM reviews WHERE job_id=?", (job,)) == [(0,)]
    assert not list((site["storage"] / "dropin-outbox").glob("*.dcm"))


def test_accept_sends_the_corrected_revision_once_and_no_correction_after(site):
    job = site["jobs"]["race"]  # after the race: revision 1 by the winner
    roi = roi_of(site, job)
    ds_shown, mask_shown = result(site, job)
    status, out = post(site, "ruth", job, {"roi": roi, "decision": "accept", "rating": 2, "revision": 1}, "review")
    assert status == 200 and out["state"] == "sent" and out["revision"] == 1, out
    (sent,) = list((site["storage"] / "dropin-outbox").glob("*.dcm"))
    ds = pydicom.dcmread(sent)
    assert ds.SOPInstanceUID == ds_shown.SOPInstanceUID  # exactly the revision on screen
    assert ds.ROIContourSequence[0].ContourSequence[0].ContourData == \
        ds_shown.ROIContourSequence[0].ContourSequence[0].ContourData
    assert "1 reviewer correction" in ds.StructureSetDescription
    status, out = post(site, "rhea", job, {"roi": roi, "kind": "extent", "first": 4, "last": 8})
    assert status == 409 and "not awaiting_review" in out["error"]
    accepted = [json.loads(d) for (d,) in query(
        site, "SELECT details FROM audit WHERE job_id=? AND event='job.accepted'", (job,))]
    assert [(a["user"], a["revision"], a["corrections"]) for a in accepted] == [("ruth", 1, 1)]
    reads = [json.loads(d)["user"] for (d,) in query(
        site, "SELECT details FROM audit WHERE job_id=? AND event='job.result_read'", (job,))]
    assert reads and set(reads) <= {"rhea", "ruth"}
    from db.audit import verify
    from db.engine import open_database

    factory = open_database(site["db"])
    with factory() as session:
        assert verify(session)[1] == []
    factory.kw["bind"].dispose()
