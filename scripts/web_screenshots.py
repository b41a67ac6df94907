"""The review page's screenshots in docs/img/, taken in Debian's Chromium (Playwright) on a real job.

The bundled kind of case: the real sts-001 CT with a box prompt on the GTV's middle slice, dropped in
the inbox, propagated by the worker and held for review; `rtprop web` serves it. A reviewer opens the
page (prompt slice), goes to a slice where the result missed the clinician's GTV, clicks there
(positive click), zooms in and paints with the brush. Needs ../shared/data (the sts-001 CT).

    .venv/bin/python scripts/web_screenshots.py [--out docs/img]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from pipeline_helpers import STS_CT, gtv_prompts, make_prompt_rtstruct  # noqa: E402
from web_helpers import WebProcess, add_user, browser, run_dropped_cases  # noqa: E402

PASSWORD = "review-pass-1"


def site(root: Path) -> tuple[Path, dict]:
    from config.load import load_config, resolve_storage
    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series

    case = root / "cases" / "sts-001"
    case.mkdir(parents=True)
    for f in (STS_CT / "image").iterdir():
        shutil.copy(f, case / f.name)
    volume = read_series(STS_CT / "image")
    gtv = read_rtstruct(next((STS_CT / "rtstruct").iterdir()), volume).rois[0].mask
    p = gtv_prompts(volume, gtv)
    make_prompt_rtstruct(volume, case / "RS_prompt.dcm", boxes=[("GTV", p["slice"], p["box"])])
    config = resolve_storage(load_config(None, overrides={
        "storage": {"root": str(root / "storage"), "fsync": False}, "node": {"series_quiet_period_s": 0},
        "pipeline": {"poll_interval_s": 0.1, "isolate_jobs": False}, "dropin": {"stable_s": 0},
        "review": {"before_send": True}}))
    factory, _ = run_dropped_cases(config, [case])
    factory.kw["bind"].dispose()
    add_user(root / "storage", "dana", "reviewer", PASSWORD)
    return root / "storage", {"volume": volume, "gtv": gtv}


def main() -> None:
    from converters.rtstruct_read import read_rtstruct
    from scipy import ndimage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rtprop-shots-") as tmp:
        storage, case = site(Path(tmp))
        import sqlite3

        with sqlite3.connect(storage / "rtprop.sqlite") as con:
            job, result_path = con.execute("SELECT id, result_path FROM jobs").fetchone()
        result = read_rtstruct(result_path, case["volume"]).rois[0].mask
        miss = case["gtv"] & ~result
        z = int(np.argmax(miss.sum(axis=(1, 2))))
        depth = ndimage.distance_transform_edt(np.pad(miss[z], 1))[1:-1, 1:-1]
        row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
        ny, nx = result.shape[1:]
        with WebProcess(Path(tmp), storage) as web:
            pw, chromium = browser()
            try:
                page = chromium.new_page(viewport={"width": 1600, "height": 960})
                page.goto(f"{web.url}/jobs/{job}/review")
                page.fill("input[name=username]", "dana")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_selector("#contours-layer polygon")
                page.wait_for_timeout(1500)
                page.screenshot(path=str(args.out / "review-prompt-slice.png"))

                def at(c: float, r: float) -> tuple[float, float]:
                    box = page.locator("#slice-img").bounding_box()
                    return box["x"] + (c + 0.5) * box["width"] / nx, box["y"] + (r + 0.5) * box["height"] / ny

                page.fill("#slider", str(z))
                page.dispatch_event("#slider", "input")
                page.keyboard.press("p")
                page.mouse.click(*at(col, row))
                page.wait_for_function("document.getElementById('viewer').dataset.shownRevision === '1'",
                                       timeout=600_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(args.out / "review-after-click.png"))

                page.keyboard.press("d")
                page.mouse.move(*at(col, row))
                page.keyboard.down("Control")  # Ctrl + wheel: zoom in around the pointer
                for _ in range(5):
                    page.mouse.wheel(0, -100)
                page.keyboard.up("Control")
                page.wait_for_timeout(500)
                page.mouse.move(*at(col, row))
                page.mouse.down()
                for k in range(30):  # out across the contour's right edge: the outline grows there
                    page.mouse.move(*at(col + 3 * k, row - k // 2))
                page.screenshot(path=str(args.out / "review-brush.png"))
                page.mouse.up()
                page.wait_for_function("document.getElementById('viewer').dataset.shownRevision === '2'",
                                       timeout=600_000)
            finally:
                chromium.close()
                pw.stop()
    for name in ("review-prompt-slice.png", "review-after-click.png", "review-brush.png"):
        print(args.out / name)


if __name__ == "__main__":
    main()
