"""Review before send with corrections, end to end, in a real browser: Debian's headless Chromium
(Playwright) on the web app of a real `rtprop serve`, fed the real sts-001 CT and two prompt RTSTRUCTs by
DCMTK storescu, sending to a DCMTK storescp playing the TPS.

Everything the test checks on screen and in files is computed here from the CT files' own
ImagePositionPatient / ImageOrientationPatient / PixelSpacing and the RTSTRUCTs' ContourData, not
through rtprop's geometry code:
- the page opens on the prompt slice, and the orange contour on screen lies where the result's
  ContourData puts it;
- a positive click, at the screen position of a voxel of the clinician's GTV that the result missed,
  makes a revision whose contour on that slice encloses the clicked point (it did not before), and
  the page draws it there; undo restores the result exactly; the same click again brings it back;
- accept sends that corrected RTSTRUCT exactly once to storescp, its contour the corrected one;
- the second job is rejected: nothing more arrives.
Screenshots are kept in tests/artifacts/ (review-page.png, review-corrected.png).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath

from node_helpers import NodeProcess, StoreSCP, free_port, storescu, wait_for
from pipeline_helpers import STS_CT, gtv_prompts, make_prompt_rtstruct
from web_helpers import ARTIFACTS, add_user, browser, have_playwright

pytestmark = pytest.mark.skipif(not have_playwright(), reason="playwright or DCMTK missing")
PASSWORD = "review-pass-1"
ENGINE_TIMEOUT_MS = 600_000  # a click re-propagates the structure (slow on a loaded 2-core machine)


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
    return {"first": first, "second": second, "slice": p["slice"], "images": sorted((STS_CT / "image").iterdir()),
            "reference": next((STS_CT / "rtstruct").iterdir())}


class Headers:
    """The CT series' geometry from its own headers: slices sorted along the normal, patient mm <-> pixels."""

    def __init__(self, images: list[Path]) -> None:
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in images]
        iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
        self.row_dir, self.col_dir = iop[:3], iop[3:]
        self.normal = np.cross(self.row_dir, self.col_dir)
        headers.sort(key=lambda h: float(np.dot([float(v) for v in h.ImagePositionPatient], self.normal)))
        self.origins = [np.array([float(v) for v in h.ImagePositionPatient]) for h in headers]
        self.row_spacing, self.col_spacing = (float(v) for v in headers[0].PixelSpacing)
        self.rows, self.columns = int(headers[0].Rows), int(headers[0].Columns)

    def slice_of(self, point_mm: np.ndarray) -> int:
        return int(np.argmin([abs(np.dot(point_mm - o, self.normal)) for o in self.origins]))

    def to_pixels(self, pts_mm: np.ndarray, z: int) -> np.ndarray:
        """(N, 3) patient mm on slice z -> (N, 2) continuous (column, row)."""
        d = pts_mm - self.origins[z]
        return np.column_stack([d @ self.row_dir / self.col_spacing, d @ self.col_dir / self.row_spacing])

    def contours(self, rtstruct: Path | pydicom.Dataset, z: int, roi: int = 0) -> list[np.ndarray]:
        """The ROI's polygons on slice z, in (column, row) pixels."""
        ds = rtstruct if isinstance(rtstruct, pydicom.Dataset) else pydicom.dcmread(rtstruct)
        out = []
        for contour in ds.ROIContourSequence[roi].get("ContourSequence", []):
            pts = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            if self.slice_of(pts[0]) == z:
                out.append(self.to_pixels(pts, z))
        return out

    def inside(self, rtstruct: Path | pydicom.Dataset, z: int, col: int, row: int) -> bool:
        """Is pixel (col, row) of slice z inside the ROI (even-odd over its polygons)?"""
        return sum(PolygonPath(p).contains_point((col, row)) for p in self.contours(rtstruct, z)) % 2 == 1

    def mask(self, rtstruct: Path, z: int) -> np.ndarray:
        cols, rows = np.meshgrid(np.arange(self.columns), np.arange(self.rows))
        grid = np.column_stack([cols.ravel(), rows.ravel()])
        inside = np.zeros(len(grid), dtype=int)
        for p in self.contours(rtstruct, z):
            inside += PolygonPath(p).contains_points(grid)
        return (inside % 2 == 1).reshape(self.rows, self.columns)


def missed_voxel(headers: Headers, reference: Path, result: Path) -> tuple[int, int, int]:
    """(slice, column, row): the voxel of the clinician's GTV deepest inside a region the result missed."""
    from scipy import ndimage

    best = (-1.0, 0, 0, 0)
    for z in range(len(headers.origins)):
        miss = headers.mask(reference, z) & ~headers.mask(result, z)
        if miss.sum() < 20:
            continue
        depth = ndimage.distance_transform_edt(np.pad(miss, 1))[1:-1, 1:-1]
        row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
        best = max(best, (float(depth[row, col]), z, int(col), int(row)))
    assert best[0] >= 2, "the result missed nothing of the GTV: no place for a positive click"
    return best[1], best[2], best[3]


def screen_point(page, headers: Headers, col: float, row: float) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Where pixel (col, row) of the slice is on screen: the image element shows the whole slice."""
    box = page.locator("#slice-img").bounding_box()
    return (box["x"] + (col + 0.5) * box["width"] / headers.columns,
            box["y"] + (row + 0.5) * box["height"] / headers.rows)


def colour_mask(rgb: np.ndarray, colour: tuple) -> np.ndarray:
    """Pixels of the ROI's colour (grey CT pixels have R == G == B, so never match a saturated colour)."""
    diff = np.abs(rgb[..., :3].astype(int) - np.array(colour)).max(axis=-1)
    return (diff <= 40) & (rgb[..., :3].astype(int).max(axis=-1) - rgb[..., :3].astype(int).min(axis=-1) > 60)


def drawn_where_expected(page, headers: Headers, polygons: list[np.ndarray], colour: tuple,  # type: ignore[no-untyped-def]
                         name: str) -> None:
    """The ROI's colour on screen runs along `polygons` (pixel coordinates) and nowhere else on the image."""
    import io

    from PIL import Image

    box = page.locator("#slice-img").bounding_box()
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=box))).convert("RGB"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    scale_x, scale_y = shot.shape[1] / headers.columns, shot.shape[0] / headers.rows
    drawn = colour_mask(shot, colour)
    ys, xs = np.nonzero(drawn)
    assert len(xs) > 50, "no contour drawn in the ROI's colour"
    samples = []
    for p in polygons:
        closed = np.vstack([p, p[:1]])
        for a, b in zip(closed[:-1], closed[1:]):
            n = max(1, int(np.ceil(np.linalg.norm((b - a) * [scale_x, scale_y]) / 0.5)))
            samples.append(a + (b - a) * np.linspace(0, 1, n, endpoint=False)[:, None])
    samples = (np.vstack(samples) + 0.5) * [scale_x, scale_y]
    padded = np.pad(drawn, 3)
    hits = [padded[int(y) + 1:int(y) + 6, int(x) + 1:int(x) + 6].any() for x, y in samples]
    assert np.mean(hits) >= 0.97, f"only {np.mean(hits):.1%} of the outline is drawn where it belongs"
    dist = np.min(np.hypot(xs[:, None] - samples[None, ::3, 0], ys[:, None] - samples[None, ::3, 1]), axis=1)
    assert np.mean(dist <= 3) >= 0.97, f"contour pixels off the outline: max {dist.max():.1f} px"
    moved = np.mean([padded[int(y) + 1:int(y) + 6, int(x + 6 * scale_x) + 1:int(x + 6 * scale_x) + 6].any()
                     for x, y in samples])
    assert moved < 0.5  # the same outline 6 pixels to the right would not pass: the check can fail


def until(page, expression: str, timeout_ms: float = 30_000) -> None:  # type: ignore[no-untyped-def]
    """Poll `expression` in the page until it is true: the page's CSP (no 'unsafe-eval') refuses
    Playwright's wait_for_function, while evaluate runs outside the page's policy."""
    end = time.monotonic() + timeout_ms / 1000
    while not page.evaluate(expression):
        assert time.monotonic() < end, f"not true within {timeout_ms / 1000:.0f} s: {expression}"
        time.sleep(0.1)


def go_to(page, z: int) -> None:  # type: ignore[no-untyped-def]
    start = int(page.locator("#slice-label").get_attribute("data-slice"))
    page.locator("#axial-pane").hover()
    for _ in range(abs(z - start)):
        page.keyboard.press("ArrowUp" if z > start else "ArrowDown")
    until(page, f"document.getElementById('slice-label').dataset.slice === '{z}'")
    until(page, "document.getElementById('slice-img').complete")


def shown(page, revision: int) -> None:  # type: ignore[no-untyped-def]
    until(page, f"document.getElementById('viewer').dataset.shownRevision === '{revision}'", ENGINE_TIMEOUT_MS)
    until(page, f"document.getElementById('contours-layer').dataset.revision === '{revision}'")


def test_review_in_browser_click_undo_accept_sends_the_corrected_contour_once(tmp_path, prompts):
    headers = Headers(prompts["images"])
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
            original = Path(first[2])
            colour = tuple(int(c) for c in pydicom.dcmread(original).ROIContourSequence[0].ROIDisplayColor)
            z, col, row = missed_voxel(headers, prompts["reference"], original)
            assert not headers.inside(original, z, col, row)

            pw, chromium = browser()
            try:
                page = chromium.new_page(viewport={"width": 1500, "height": 1000})
                base = f"http://127.0.0.1:{web_port}"
                page.goto(f"{base}/jobs/{first[0]}/review")
                assert "/login" in page.url  # not logged in: sent to the login page
                page.fill("input[name=username]", "dana")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_selector("#contours-layer polygon")
                assert f"/jobs/{first[0]}/review" in page.url
                # it opens on the prompt slice, numbered from 0 as in the CLI
                assert int(page.locator("#slice-label").get_attribute("data-slice")) == prompt_slice
                assert f"Slice {prompt_slice} (0–58)" in page.locator("#slice-label").inner_text()
                assert "PROMPT SLICE" in page.locator("#slice-label").inner_text()
                until(page, "document.getElementById('slice-img').complete")
                box = page.locator("#slice-img").bounding_box()
                assert box["width"] > 2 * headers.columns  # the image fills the panel, not 1:1
                drawn_where_expected(page, headers, headers.contours(original, prompt_slice), colour, "review-page.png")

                # a positive click where the result missed the GTV: the contour appears there
                go_to(page, z)
                assert page.locator("#contours-layer polygon").count() == len(headers.contours(original, z))
                page.keyboard.press("p")
                page.mouse.click(*screen_point(page, headers, col, row))
                shown(page, 1)
                (rev1,) = node.query("SELECT rtstruct_path FROM revisions WHERE job_id=? AND number=1", (first[0],))[0]
                assert headers.inside(Path(rev1), z, col, row), "the click's voxel is not inside the new contour"
                drawn_where_expected(page, headers, headers.contours(Path(rev1), z), colour, "review-corrected.png")
                assert "1 correction" in page.locator("section.roi [data-field=summary]").inner_text()

                # undo restores the result as it was
                page.keyboard.press("Control+z")
                shown(page, 2)
                (rev2,) = node.query("SELECT rtstruct_path FROM revisions WHERE job_id=? AND number=2", (first[0],))[0]
                assert not headers.inside(Path(rev2), z, col, row)
                for k in range(len(headers.origins)):
                    assert np.array_equal(headers.mask(Path(rev2), k), headers.mask(original, k)), f"slice {k}"
                assert page.locator("#contours-layer polygon").count() == len(headers.contours(original, z))

                # the same click again, then accept: the corrected contour goes to the TPS
                page.mouse.click(*screen_point(page, headers, col, row))
                shown(page, 3)
                (rev3,) = node.query("SELECT rtstruct_path FROM revisions WHERE job_id=? AND number=3", (first[0],))[0]
                assert headers.inside(Path(rev3), z, col, row)
                assert page.locator("form.decide .revision-field").input_value() == "3"
                page.locator("form.decide input[name=rating][value='2']").check()
                page.fill("form.decide textarea[name=comment]", "one click at the caudal end")
                page.click("form.decide button.accept")
                page.wait_for_selector(".decision-label.accepted")
                label = page.locator(".decision-label.accepted")
                assert "Accepted by dana" in label.inner_text()
                fg, bg = label.evaluate("e => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor]")
                assert fg != bg  # readable: never red on red again
                wait_for(lambda: node.query("SELECT state FROM jobs WHERE id=?", (first[0],))[0][0] == "sent", 120,
                         0.3, what="the accepted job to be sent")

                page.goto(f"{base}/jobs/{second[0]}/review")
                page.wait_for_selector("form.decide button.reject")
                page.click("form.decide button.reject")
                page.wait_for_selector(".decision-label.rejected")
            finally:
                chromium.close()
                pw.stop()
            assert node.query("SELECT state FROM jobs WHERE id=?", (second[0],))[0][0] == "rejected"
            time.sleep(3)  # a second copy or the rejected job's result would have arrived by now
            reviews = node.query("SELECT job_id, roi, decision, rating, comment, user FROM reviews ORDER BY id")
            events = node.query("SELECT event, job_id, details FROM audit WHERE event LIKE 'job.%' ORDER BY id")
            sends = node.query("SELECT job_id, state, path FROM sends")
        files = tps.files()
        assert len(files) == 1 and tps.stores_received() == 1
        delivered = pydicom.dcmread(files[0])
        corrected = pydicom.dcmread(rev3)
        assert delivered.SOPInstanceUID == corrected.SOPInstanceUID != pydicom.dcmread(original).SOPInstanceUID
        assert headers.inside(delivered, z, col, row)  # the contour the TPS got is the corrected one
        assert [c.ContourData for c in delivered.ROIContourSequence[0].ContourSequence] == \
            [c.ContourData for c in corrected.ROIContourSequence[0].ContourSequence]
        assert delivered.StructureSetROISequence[0].ROIGenerationAlgorithm == "SEMIAUTOMATIC"
        assert "1 reviewer correction" in delivered.StructureSetDescription
        assert [(j, s) for j, s, _ in sends] == [(first[0], "sent")]
        assert reviews == [(first[0], "GTV_prop", "accept", 2, "one click at the caudal end", "dana"),
                           (second[0], "Mass_prop", "reject", None, "", "dana")]
        made = [(e, json.loads(d).get("user"), json.loads(d).get("revision")) for e, j, d in events
                if j == first[0] and e in ("job.correction", "job.undo", "job.review", "job.accepted")]
        assert made == [("job.correction", "dana", 1), ("job.undo", "dana", 2), ("job.correction", "dana", 3),
                        ("job.review", "dana", 3), ("job.accepted", "dana", 3)]


def test_review_page_has_no_inline_script_style_or_handler():
    """The page runs under a Content-Security-Policy with script-src 'self' (no inline code, no inline styles)."""
    import re

    from web.app import HERE

    page = (HERE / "templates" / "review.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "an inline <script>"
    assert not re.search(r"\sstyle\s*=", page), "an inline style attribute"
    assert not re.search(r"\son[a-z]+\s*=", page), "an inline event handler"
    assert "<style" not in page
    script = (HERE / "static" / "review.js").read_text()
    assert "eval(" not in script and "new Function" not in script and "setAttribute(\"style\"" not in script
