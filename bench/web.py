"""Web app benchmark: slice images of a 500-slice 512x512 CT, and corrections on the review page.

1. Slice images. A synthetic CT (soft tissue with a bright ellipsoid, 500 slices of 512x512) is stored
   the way the node stores instances (dicom_node.storage.Store), an RTSTRUCT of the ellipsoid is
   written by rtprop's own writer, and a job awaiting review points at both. `rtprop web` is started
   on loopback, a reviewer logs in, and slice PNGs are fetched over HTTP, one request per slice as
   the review page does. Target: median <= 100 ms per slice image.
2. Corrections. The same kind of site with a 512x512 CT of `--correction-slices` slices (default
   120) whose result stops short of the ellipsoid at both ends. Debian's Chromium (Playwright) opens
   the review page and a reviewer corrects as a person would: a positive click beyond the result's
   last slice, a box beyond its first slice, "Last slice here", a brush stroke, each followed by an
   undo. Per correction: the time from the click (pointer up) to the API's 201 (the new revision
   exists: recorded, its RTSTRUCT written and file-checked) and to the page showing its contour;
   the server's own stages from its Server-Timing header. Target: new contour within 1 s (median).

    .venv/bin/python bench/web.py [--slices 500] [--requests 200] [--correction-slices 120] [--rounds 3]
                                  [--only slices|corrections]

Prints tables; writes bench/results/web.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from phantoms import ball, write_series  # noqa: E402
from web_helpers import Client, WebProcess, add_user, browser  # noqa: E402

PASSWORD = "review-pass-1"  # not containing the user name (web/auth.py refuses it)


def build_site(root: Path, slices: int, *, cut: int = 0) -> tuple[Path, int, dict]:
    """Storage with one series, its RTSTRUCT and a job awaiting review (a box prompt on the middle slice).

    The result is the ellipsoid less `cut` slices at each end (a result that stops short); returns
    (storage, job id, {"truth": (first, last), "result": (first, last), "mask": truth mask}).
    """
    from config.load import load_config, resolve_storage
    from converters.rtstruct_write import RoiMask, write_rtstruct
    from converters.series import read_series
    from db.engine import open_configured, transaction
    from db.schema import Job, utcnow
    from dicom_node.storage import Received, Store

    series_dir = root / "series"
    shape = (slices, 512, 512)
    mask = ball(shape, (slices / 2, 256, 256), (slices / 4, 90, 110))
    rng = np.random.default_rng(0)
    image = np.where(mask, 60, 0).astype(np.int16) + rng.normal(0, 20, shape).astype(np.int16)
    print(f"writing {slices} synthetic 512x512 CT slices ...", flush=True)
    files = write_series(series_dir, image, spacing=(0.9, 0.9, 2.0), origin=(-230.0, -230.0, 0.0), seed=1)
    del image
    config = resolve_storage(load_config(None, overrides={"storage": {"root": str(root / "storage"), "fsync": False}}))
    factory = open_configured(config)
    store = Store(config.storage, factory, fsync=False)
    for f in files:
        result = store.ingest(f.read_bytes(), Received(calling_ae="BENCH", source="import"))
        assert result.status == 0, result.reason
    volume = read_series(Path(store.archive).rglob("*.dcm").__next__().parent)
    present = np.flatnonzero(mask.any(axis=(1, 2)))
    result_mask = mask.copy()
    if cut:
        result_mask[: present[0] + cut] = False
        result_mask[present[-1] - cut + 1:] = False
    out = Path(config.storage.outbox) / "bench" / "job1" / "attempt1"
    out.mkdir(parents=True, exist_ok=True)
    path = write_rtstruct(volume, [RoiMask("Ball_prop", result_mask)], out, config.rtstruct, series_description="bench")
    on = np.flatnonzero(result_mask.any(axis=(1, 2)))
    confidence = [0.9 if result_mask[z].any() else 0.0 for z in range(slices)]
    (out / "review.json").write_text(json.dumps({"rtstruct": path.name, "structures": [
        {"structure": "Ball", "roi": "Ball_prop", "slice": slices // 2, "warnings": [], "confidence": confidence}]}))
    middle = slices // 2
    rows, cols = np.flatnonzero(mask[middle].any(axis=1)), np.flatnonzero(mask[middle].any(axis=0))
    box = [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]
    with transaction(factory) as session:
        job = Job(state="awaiting_review", kind="prompt", series_instance_uid=volume.series_instance_uid,
                  study_instance_uid=volume.study_instance_uid, rtstruct_sop_instance_uid="", calling_ae="BENCH",
                  prompts=[{"structure": "Ball", "kind": "box", "slice": middle, "box": box, "sources": []}],
                  backend="classic", result_path=str(path), created_at=utcnow(), updated_at=utcnow())
        session.add(job)
        session.flush()
        job_id = job.id
    factory.kw["bind"].dispose()
    return config.storage.root, job_id, {"truth": (int(present[0]), int(present[-1])),
                                         "result": (int(on[0]), int(on[-1])), "mask": mask}


def quantiles(values: list[float]) -> dict[str, float]:
    ms = sorted(values)
    return {"median": round(statistics.median(ms), 1), "p90": round(ms[max(0, int(0.9 * len(ms)) - 1)], 1),
            "max": round(ms[-1], 1), "min": round(ms[0], 1), "n": len(ms)}


# ---------------------------------------------------------------- 1. slice images
def bench_slices(slices: int, requests: int) -> dict:
    load = round(os.getloadavg()[0], 2)  # the 2-core machine is shared: the figures depend on it
    with tempfile.TemporaryDirectory(prefix="rtprop-bench-web-") as tmp:
        root = Path(tmp)
        storage, job_id, site = build_site(root, slices)
        z0, z1 = site["result"]
        add_user(storage, "bench", "reviewer", PASSWORD)
        with WebProcess(root, storage) as web:
            client = Client(web.url)
            assert client.login("bench", PASSWORD) == 303
            t = time.perf_counter()
            status, _, page = client.get(f"/jobs/{job_id}/review")
            first_page_s = time.perf_counter() - t  # decodes the series (cold cache)
            assert status == 200, page[:300]
            t = time.perf_counter()
            status, _, state = client.get(f"/jobs/{job_id}/review/state.json")
            state_ms = 1000 * (time.perf_counter() - t)
            assert status == 200
            rng = random.Random(0)
            order = [z0 + (z1 - z0) // 2 + d for d in range(-20, 20)]  # scrolling through the middle ...
            order += [rng.randrange(slices) for _ in range(max(0, requests - len(order)))]  # ... and jumps
            times, sizes = [], []
            for z in order[:requests]:
                t = time.perf_counter()
                status, headers, png = client.get(f"/jobs/{job_id}/slices/{z}.png?level=40&width=400")
                times.append(1000 * (time.perf_counter() - t))
                assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
                sizes.append(len(png))
            planes = []
            for x in range(200, 320, 12):
                t = time.perf_counter()
                status, _, png = client.get(f"/jobs/{job_id}/planes/sagittal/{x}.png?level=40&width=400")
                planes.append(1000 * (time.perf_counter() - t))
                assert status == 200
            t = time.perf_counter()
            client.get(f"/jobs/{job_id}/review")
            warm_page_s = time.perf_counter() - t
    return {"slices": slices, "rows": 512, "cols": 512, "requests": len(times),
            "slice_png_ms": quantiles(times), "png_kb_median": round(statistics.median(sizes) / 1024, 1),
            "sagittal_png_ms": quantiles(planes), "state_json_ms": round(state_ms, 1), "state_json_kb": len(state) // 1024,
            "review_page_cold_s": round(first_page_s, 2), "review_page_warm_ms": round(1000 * warm_page_s, 1),
            "target_median_ms": 100, "load_1min_at_start": load}


# ---------------------------------------------------------------- 2. corrections on the page
def bench_corrections(slices: int, rounds: int) -> dict:
    load = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="rtprop-bench-corr-") as tmp:
        root = Path(tmp)
        storage, job_id, site = build_site(root, slices, cut=max(3, slices // 12))
        add_user(storage, "bench", "reviewer", PASSWORD)
        (t0, t1), (r0, r1) = site["truth"], site["result"]
        with WebProcess(root, storage) as web:
            pw, chromium = browser()
            try:
                page = chromium.new_page(viewport={"width": 1600, "height": 1000})
                server_timing: dict[int, str] = {}
                page.on("response", lambda r: server_timing.__setitem__(len(server_timing), r.headers.get(
                    "server-timing", "")) if "/corrections" in r.url and r.status == 201 else None)
                page.goto(f"{web.url}/jobs/{job_id}/review")
                page.fill("input[name=username]", "bench")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                # attribute selectors, not wait_for_function: the page's CSP (script-src 'self') refuses eval
                page.wait_for_selector("#contours-layer[data-revision]", state="attached")
                stage = page.locator("#slice-img")
                rows: list[dict] = []
                revision = 0

                def goto(z: int) -> None:
                    page.fill("#slider", str(z))
                    page.dispatch_event("#slider", "input")
                    page.wait_for_selector(f"#slice-label[data-slice='{z}']", state="attached")

                def screen(x: float, y: float) -> tuple[float, float]:
                    box = stage.bounding_box()
                    return box["x"] + (x + 0.5) * box["width"] / 512, box["y"] + (y + 0.5) * box["height"] / 512

                def wait_revision(kind: str) -> None:
                    nonlocal revision
                    revision += 1
                    page.wait_for_selector(f"#viewer[data-shown-revision='{revision}']", state="attached",
                                           timeout=600_000)
                    post = float(page.get_attribute("#viewer", "data-last-post-ms"))
                    shown = float(page.get_attribute("#viewer", "data-last-shown-ms"))
                    rows.append({"kind": kind, "post_ms": post, "shown_ms": shown, "revision": revision})
                    print(f"  revision {revision:3d} {kind:8s} POST -> revision {post:7.0f} ms, shown {shown:7.0f} ms",
                          flush=True)

                for i in range(rounds):
                    goto(min(t1, r1 + 2))  # a positive click past the result's last slice, inside the ellipsoid
                    page.keyboard.press("p")
                    page.mouse.click(*screen(256 + 4 * i, 256))
                    wait_revision("point")
                    page.keyboard.press("u")
                    wait_revision("undo")
                    goto(max(t0, r0 - 2))  # a box past the result's first slice
                    page.keyboard.press("x")
                    x, y = screen(200 - i, 210)
                    page.mouse.move(x, y)
                    page.mouse.down()
                    page.mouse.move(*screen(312 + i, 300), steps=4)
                    page.mouse.up()
                    wait_revision("box")
                    page.keyboard.press("u")
                    wait_revision("undo")
                    goto(r1 - 2 - i)  # the structure ends here
                    page.keyboard.press("l")
                    wait_revision("extent")
                    page.keyboard.press("u")
                    wait_revision("undo")
                    goto((r0 + r1) // 2 + 3 + i)  # a brush stroke widening the outline on one slice
                    page.keyboard.press("d")
                    page.mouse.move(*screen(250, 250))
                    page.mouse.down()
                    for k in range(8):
                        page.mouse.move(*screen(250 + 12 * k, 250 + 2 * k))
                    page.mouse.up()
                    wait_revision("outline")
                    page.keyboard.press("u")
                    wait_revision("undo")
                page.screenshot(path=str(root / "page.png"))
            finally:
                chromium.close()
                pw.stop()
    stages: dict[str, list[float]] = {}
    for header in server_timing.values():
        for part in filter(None, (p.strip() for p in header.split(","))):
            name, _, dur = part.partition(";dur=")
            stages.setdefault(name, []).append(float(dur))
    corrections = [r for r in rows if r["kind"] != "undo"]
    undos = [r for r in rows if r["kind"] == "undo"]
    by_kind = {k: quantiles([r["shown_ms"] for r in corrections if r["kind"] == k])
               for k in dict.fromkeys(r["kind"] for r in corrections)}
    return {"slices": slices, "rows": 512, "cols": 512, "rounds": rounds,
            "correction_post_to_revision_ms": quantiles([r["post_ms"] for r in corrections]),
            "correction_click_to_page_ms": quantiles([r["shown_ms"] for r in corrections]),
            "undo_post_to_revision_ms": quantiles([r["post_ms"] for r in undos]),
            "undo_click_to_page_ms": quantiles([r["shown_ms"] for r in undos]),
            "shown_ms_by_kind": by_kind,
            "server_stages_ms_median": {k: round(statistics.median(v), 1) for k, v in stages.items()},
            "target_median_ms": 1000, "load_1min_at_start": load, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--correction-slices", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of point, box, extent, outline (each undone)")
    parser.add_argument("--only", choices=("slices", "corrections"))
    args = parser.parse_args()
    out = REPO / "bench" / "results" / "web.json"
    result = json.loads(out.read_text()) if args.only and out.is_file() else {}  # --only: keep the other part
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    if args.only != "corrections":
        result["slice_images"] = s = bench_slices(args.slices, args.requests)
        print()
        print("| slice images | value |")
        print("| --- | --- |")
        print(f"| slice PNG, median of {s['requests']} (p90, max) | {s['slice_png_ms']['median']} ms "
              f"({s['slice_png_ms']['p90']}, {s['slice_png_ms']['max']}) |")
        print(f"| sagittal reconstruction PNG, median | {s['sagittal_png_ms']['median']} ms |")
        print(f"| state.json (contours, confidence), {s['state_json_kb']} kB | {s['state_json_ms']} ms |")
        print(f"| review page, first open (series decoded) / cached | {s['review_page_cold_s']} s / "
              f"{s['review_page_warm_ms']} ms |")
        print(f"| target: slice median <= 100 ms | {'met' if s['slice_png_ms']['median'] <= 100 else 'MISSED'} |")
    if args.only != "slices":
        result["corrections"] = c = bench_corrections(args.correction_slices, args.rounds)
        print()
        print(f"| corrections, {c['slices']} x 512 x 512 CT, {c['rounds']} rounds | median | p90 | max |")
        print("| --- | --- | --- | --- |")
        for key, name in (("correction_post_to_revision_ms", "click -> new revision (API 201)"),
                          ("correction_click_to_page_ms", "click -> page shows the new contour"),
                          ("undo_post_to_revision_ms", "undo -> revision"), ("undo_click_to_page_ms", "undo -> shown")):
            q = c[key]
            print(f"| {name} | {q['median']:.0f} ms | {q['p90']:.0f} ms | {q['max']:.0f} ms |")
        for kind, q in c["shown_ms_by_kind"].items():
            print(f"| {kind}: click -> shown | {q['median']:.0f} ms | {q['p90']:.0f} ms | {q['max']:.0f} ms |")
        print("| server stages (median ms) | " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                          c["server_stages_ms_median"].items()) + " | | |")
        met = c["correction_click_to_page_ms"]["median"] <= 1000
        print(f"| target: new contour within 1 s (median) | {'met' if met else 'MISSED'} | | |")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
