"""Web app benchmark: how fast the review page serves slice images of a 500-slice 512x512 CT.

A synthetic CT (soft tissue with a bright ellipsoid, 500 slices of 512x512) is stored the way the
node stores instances (dicom_node.storage.Store), an RTSTRUCT of the ellipsoid is written by
rtprop's own writer, and a job awaiting review points at both. `rtprop web` is started on loopback,
a reviewer logs in, and slice PNGs (contour drawn) are fetched over HTTP, one request per slice as
the review page does. Target: median <= 100 ms per slice image.

    .venv/bin/python bench/web.py [--slices 500] [--requests 200]

Prints a table; writes bench/results/web.json. The first request (decoding the series) is reported
apart from the steady state.
"""
from __future__ import annotations

import argparse
import json
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
from web_helpers import Client, WebProcess, add_user  # noqa: E402


def build_site(root: Path, slices: int) -> tuple[Path, int, tuple[int, int]]:
    """Storage with one series, its RTSTRUCT and a job awaiting review; returns (storage, job id, contour z range)."""
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
    files = write_series(series_dir, image, spacing=(0.9, 0.9, 1.0), origin=(-230.0, -230.0, 0.0), seed=1)
    del image
    config = resolve_storage(load_config(None, overrides={"storage": {"root": str(root / "storage"), "fsync": False}}))
    factory = open_configured(config)
    store = Store(config.storage, factory, fsync=False)
    for f in files:
        result = store.ingest(f.read_bytes(), Received(calling_ae="BENCH", source="import"))
        assert result.status == 0, result.reason
    volume = read_series(Path(store.archive).rglob("*.dcm").__next__().parent)
    out = Path(config.storage.outbox) / "bench" / "job1" / "attempt1"
    out.mkdir(parents=True, exist_ok=True)
    path = write_rtstruct(volume, [RoiMask("Ball_prop", mask)], out, config.rtstruct, series_description="bench")
    present = np.flatnonzero(mask.any(axis=(1, 2)))
    confidence = [0.9 if mask[z].any() else 0.0 for z in range(slices)]
    (out / "review.json").write_text(json.dumps({"rtstruct": path.name, "structures": [
        {"structure": "Ball", "roi": "Ball_prop", "slice": slices // 2, "warnings": [], "confidence": confidence}]}))
    with transaction(factory) as session:
        job = Job(state="awaiting_review", kind="prompt", series_instance_uid=volume.series_instance_uid,
                  study_instance_uid=volume.study_instance_uid, rtstruct_sop_instance_uid="", calling_ae="BENCH",
                  prompts=[{"structure": "Ball", "kind": "box", "slice": slices // 2, "sources": []}],
                  backend="classic", result_path=str(path), created_at=utcnow(), updated_at=utcnow())
        session.add(job)
        session.flush()
        job_id = job.id
    factory.kw["bind"].dispose()
    return config.storage.root, job_id, (int(present[0]), int(present[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtprop-bench-web-") as tmp:
        root = Path(tmp)
        storage, job_id, (z0, z1) = build_site(root, args.slices)
        add_user(storage, "bench", "reviewer", "slices-and-contours-1")
        with WebProcess(root, storage) as web:
            client = Client(web.url)
            assert client.login("bench", "slices-and-contours-1") == 303
            t = time.perf_counter()
            status, _, page = client.get(f"/jobs/{job_id}/review")
            first_page_s = time.perf_counter() - t  # decodes the series (cold cache)
            assert status == 200, page[:300]
            rng = random.Random(0)
            order = [z0 + (z1 - z0) // 2 + d for d in range(-20, 20)]  # scrolling through the middle ...
            order += [rng.randrange(args.slices) for _ in range(max(0, args.requests - len(order)))]  # ... and jumps
            times, sizes, contoured = [], [], 0
            for z in order[: args.requests]:
                t = time.perf_counter()
                status, headers, png = client.get(f"/jobs/{job_id}/slices/{z}.png?window=soft")
                times.append(time.perf_counter() - t)
                assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
                sizes.append(len(png))
                contoured += z0 <= z <= z1
            t = time.perf_counter()
            client.get(f"/jobs/{job_id}/review")
            warm_page_s = time.perf_counter() - t
    ms = sorted(1000 * x for x in times)
    result = {
        "slices": args.slices, "rows": 512, "cols": 512, "requests": len(times), "with_contour": contoured,
        "slice_png_ms": {"median": round(statistics.median(ms), 2), "p90": round(ms[int(0.9 * len(ms)) - 1], 2),
                         "max": round(ms[-1], 2), "min": round(ms[0], 2)},
        "png_kb_median": round(statistics.median(sizes) / 1024, 1),
        "review_page_cold_s": round(first_page_s, 2), "review_page_warm_ms": round(1000 * warm_page_s, 1),
        "target_median_ms": 100, "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
    }
    print()
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| slice image (PNG, contour drawn), median of {len(times)} | {result['slice_png_ms']['median']} ms |")
    print(f"| slice image p90 / max | {result['slice_png_ms']['p90']} / {result['slice_png_ms']['max']} ms |")
    print(f"| PNG size, median | {result['png_kb_median']} kB |")
    print(f"| review page, first open (series decoded) | {result['review_page_cold_s']} s |")
    print(f"| review page, cached | {result['review_page_warm_ms']} ms |")
    print(f"| target: slice median <= 100 ms | {'met' if result['slice_png_ms']['median'] <= 100 else 'MISSED'} |")
    out = REPO / "bench" / "results" / "web.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
