"""Review before send, end to end, in a real browser: Debian's headless Chromium (Playwright) on the
web app of a real `rtprop serve`, fed the real sts-001 CT and two prompt RTSTRUCTs by DCMTK storescu.

The reviewer logs in, opens the first job, scrolls (mouse wheel) to the prompt slice and the test
checks that the orange contour pixels on screen are where the result RTSTRUCT's ContourData puts
them, computed here from the CT files' own ImagePositionPatient / ImageOrientationPatient /
PixelSpacing (not through rtprop's geometry code). Accept: the RTSTRUCT arrives once at a DCMTK
storescp. The second job is rejected: nothing more arrives. Page screenshots are kept in
tests/artifacts/ (review-page.png on the prompt slice, review-page-off-prompt.png six slices away).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node_helpers import NodeProcess, StoreSCP, free_port, storescu, wait_for
from pipeline_helpers import STS_CT, gtv_prompts, make_prompt_rtstruct
from web_helpers import ARTIFACTS, add_user, browser, have_playwright

pytestmark = pytest.mark.skipif(not have_playwright(), reason="playwright or DCMTK missing")
PASSWORD = "review-pass-1"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series

    out = tmp_path_factory.mktemp("prompts")
    volume = read_series(STS_CT / "image")
    gtv = read_rtstruct(next((STS_CT / "rtstruct").iterdir()), volume).rois[0].mask
    p = gtv_prompts(volume, gtv)
    first = make_prompt_rtstruct(volume, out / "RS_first.dcm", boxes=[("GTV", p["slice"], p["box"])])
    second = make_prompt_rtstruct(volume, out / "RS_second.dcm", boxes=[("Mass", p["slice"], p["box"])])
    return {"first": first, "second": second, "slice": p["slice"], "images": sorted((STS_CT / "image").iterdir())}


def expected_display_points(result: Path, images: list[Path], z: int, scale: int) -> tuple[list[np.ndarray], tuple]:
    """Contour polygons of slice `z` in display pixels, from ContourData and the CT headers alone."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in images]
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    headers.sort(key=lambda h: float(np.dot([float(v) for v in h.ImagePositionPatient], normal)))
    ds = pydicom.dcmread(result)
    colour = tuple(int(c) for c in ds.ROIContourSequence[0].ROIDisplayColor)
    polygons = []
    for contour in ds.ROIContourSequence[0].ContourSequence:
        pts = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
        distance = [abs(np.dot(pts[0] - [float(v) for v in h.ImagePositionPatient], normal)) for h in headers]
        if int(np.argmin(distance)) != z:
            continue
        h = headers[z]
        origin = np.array([float(v) for v in h.ImagePositionPatient])
        row_spacing, col_spacing = (float(v) for v in h.PixelSpacing)
        col = (pts - origin) @ row_dir / col_spacing  # along a row = column index
        row = (pts - origin) @ col_dir / row_spacing
        polygons.append(np.column_stack([col, row]) * scale + (scale - 1) / 2)
    return polygons, colour


def displayed_pixels(page) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The RGB pixels of the slice image as the browser decoded and draws it (read back through a canvas:
    an element screenshot at a fractional page offset would be resampled)."""
    data = page.evaluate("""() => { const i = document.getElementById('slice-img');
        const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(i, 0, 0);
        return [c.width, c.height, Array.from(g.getImageData(0, 0, c.width, c.height).data)]; }""")
    width, height, values = data
    return np.array(values, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def polyline_samples(polygon: np.ndarray, step: float = 0.5) -> np.ndarray:
    closed = np.vstack([polygon, polygon[:1]])
    out = []
    for a, b in zip(closed[:-1], closed[1:]):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        out.append(a + (b - a) * np.linspace(0, 1, n, endpoint=False)[:, None])
    return np.vstack(out)


def colour_mask(rgb: np.ndarray, colour: tuple) -> np.ndarray:
    """Pixels of the ROI's colour (grey CT pixels have R == G == B, so never match a saturated colour)."""
    diff = np.abs(rgb[..., :3].astype(int) - np.array(colour)).max(axis=-1)
    return (diff <= 40) & (rgb[..., :3].astype(int).max(axis=-1) - rgb[..., :3].astype(int).min(axis=-1) > 60)


def test_review_in_browser_accept_sends_once_reject_sends_nothing(tmp_path, prompts):
    web_port = free_port()
    with StoreSCP(tmp_path) as tps:
        node = NodeProcess(tmp_path / "node", destination=f"TPS@127.0.0.1:{tps.port}", config={
            "node": {"series_quiet_period_s": 1.0, "poll_interval_s": 0.2, "send_backoff_s": 0.5},
            "pipeline": {"poll_interval_s": 0.3, "heartbeat_interval_s": 1.0},
            "storage": {"fsync": False}, "review": {"before_send": True},
            "web": {"port": web_port, "heartbeat_interval_s": 1.0}})
        add_user(node.storage, "dana", "reviewer", PASSWORD)
        with node:
            storescu(node.port, prompts["images"] + [prompts["first"], prompts["second"]], calling_ae="ECLIPSE")
            wait_for(lambda: len(node.query("SELECT id FROM jobs WHERE state='awaiting_review'")) == 2
                     or node.query("SELECT id FROM jobs WHERE state IN ('failed','dead-letter')"), 300, 0.5,
                     what="both jobs to await review")
            rows = node.query("SELECT id, state, result_path, prompts, rtstruct_sop_instance_uid FROM jobs ORDER BY id")
            assert [r[1] for r in rows] == ["awaiting_review"] * 2, node.log()[-3000:]
            assert tps.files() == [] and node.query("SELECT count(*) FROM sends")[0][0] == 0
            by_prompt = {r[4]: r for r in rows}
            first = by_prompt[str(pydicom.dcmread(prompts["first"]).SOPInstanceUID)]
            second = by_prompt[str(pydicom.dcmread(prompts["second"]).SOPInstanceUID)]
            prompt_slice = json.loads(first[3])[0]["slice"]
            assert prompt_slice == prompts["slice"]

            pw, chromium = browser()
            try:
                # Playwright polls wait_for_function's string predicates with eval, which the pages' CSP forbids;
                # the CSP itself is tested in test_web_security.py
                page = chromium.new_page(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
                base = f"http://127.0.0.1:{web_port}"
                page.goto(f"{base}/jobs/{first[0]}/review")
                assert "/login" in page.url  # not logged in: sent to the login page
                page.fill("input[name=username]", "dana")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_selector("#slice-img")
                assert f"/jobs/{first[0]}/review" in page.url
                img = page.locator("#slice-img")
                page.wait_for_function("document.getElementById('slice-label').dataset.slice !== undefined")
                start = int(page.locator("#slice-label").get_attribute("data-slice"))
                assert start != prompt_slice  # the viewer opens at the top of the contour: we have to scroll
                img.hover()
                for _ in range(abs(prompt_slice - start)):
                    page.mouse.wheel(0, 100 if prompt_slice > start else -100)
                page.wait_for_function(f"document.getElementById('slice-label').dataset.slice == '{prompt_slice}'")
                page.wait_for_function("(() => { const i = document.getElementById('slice-img');"
                                       f" return i.complete && i.naturalWidth > 0 && i.src.includes('/slices/{prompt_slice}.png'); }})()")
                assert "PROMPT SLICE" in page.locator("#slice-label").inner_text()
                natural = page.evaluate("document.getElementById('slice-img').naturalWidth")
                columns = int(pydicom.dcmread(prompts["images"][0], stop_before_pixels=True).Columns)
                scale = natural // columns
                assert natural == columns * scale and scale >= 1
                box = img.bounding_box()
                assert round(box["width"]) == natural  # shown 1:1, so the image's pixels are the screen's
                shot = displayed_pixels(page)
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "review-page.png"), full_page=True)

                polygons, colour = expected_display_points(Path(first[2]), prompts["images"], prompt_slice, scale)
                assert polygons, "the result has no contour on the prompt slice"
                drawn = colour_mask(shot, colour)
                ys, xs = np.nonzero(drawn)
                assert len(xs) > 50, "no contour drawn in the ROI's colour"
                samples = np.vstack([polyline_samples(p) for p in polygons])
                # every point of the RTSTRUCT's outline has a contour pixel within 1.5 px on screen ...
                padded = np.pad(drawn, 2)
                hits = [padded[int(round(y)) + 2 - 1:int(round(y)) + 2 + 2, int(round(x)) + 2 - 1:int(round(x)) + 2 + 2].any()
                        for x, y in samples]
                assert np.mean(hits) >= 0.98, f"only {np.mean(hits):.1%} of the outline is drawn where it belongs"
                # ... and every contour pixel on screen lies within 1.5 px of that outline (nothing drawn elsewhere)
                dist = np.min(np.hypot(xs[:, None] - samples[None, :, 0], ys[:, None] - samples[None, :, 1]), axis=1)
                assert np.mean(dist <= 1.5) >= 0.98, f"contour pixels off the outline: max {dist.max():.1f} px"
                # the same outline moved by 4 pixels would not pass: the check can fail
                moved = np.mean([padded[int(round(y)) + 2 - 1:int(round(y)) + 2 + 2,
                                        int(round(x + 4)) + 2 - 1:int(round(x + 4)) + 2 + 2].any() for x, y in samples])
                assert moved < 0.5

                # a second artefact: six slices caudal of the prompt, where only the propagated contour is drawn
                page.keyboard.press("PageDown")
                page.wait_for_function(f"document.getElementById('slice-label').dataset.slice == '{prompt_slice - 10}'")
                for _ in range(4):
                    page.keyboard.press("ArrowUp")
                page.wait_for_function(f"document.getElementById('slice-label').dataset.slice == '{prompt_slice - 6}'")
                page.wait_for_function("document.getElementById('slice-img').complete")
                page.screenshot(path=str(ARTIFACTS / "review-page-off-prompt.png"), full_page=True)

                page.locator("form.decide input[name=rating][value='2']").check()
                page.fill("form.decide textarea[name=comment]", "small edit at the cranial end")
                page.click("form.decide button.accept")
                page.wait_for_selector(".decided.accept")
                wait_for(lambda: node.query("SELECT state FROM jobs WHERE id=?", (first[0],))[0][0] == "sent", 120,
                         0.3, what="the accepted job to be sent")

                page.goto(f"{base}/jobs/{second[0]}/review")
                page.wait_for_selector("form.decide button.reject")
                page.click("form.decide button.reject")
                page.wait_for_selector(".decided.reject")
            finally:
                chromium.close()
                pw.stop()
            assert node.query("SELECT state FROM jobs WHERE id=?", (second[0],))[0][0] == "rejected"
            time.sleep(3)  # a second copy or the rejected job's result would have arrived by now
            reviews = node.query("SELECT job_id, roi, decision, rating, comment, user FROM reviews ORDER BY id")
            events = node.query("SELECT event, job_id, details FROM audit WHERE event LIKE 'job.%' ORDER BY id")
            sends = node.query("SELECT job_id, state FROM sends")
        files = tps.files()
        assert len(files) == 1 and tps.stores_received() == 1
        assert str(pydicom.dcmread(files[0]).SOPInstanceUID) == str(pydicom.dcmread(first[2]).SOPInstanceUID)
        assert sends == [(first[0], "sent")]
        assert reviews == [(first[0], "GTV_prop", "accept", 2, "small edit at the cranial end", "dana"),
                           (second[0], "Mass_prop", "reject", None, "", "dana")]
        decisions = [(e, j, json.loads(d).get("user")) for e, j, d in events if e in ("job.review", "job.accepted",
                                                                                      "job.rejected")]
        assert decisions == [("job.review", first[0], "dana"), ("job.accepted", first[0], "dana"),
                             ("job.review", second[0], "dana"), ("job.rejected", second[0], "dana")]
