"""RTSTRUCT write + file check of a realistic result: what each revision on the review page pays.

A synthetic 512x512 CT of `--slices` slices (default 100) is written as a DICOM series and read back;
three ROIs are drawn on it: an organ with a hole (a ring on part of its slices), a structure in two
pieces per slice, and a large body outline with an irregular edge (~280,000 contour coordinates; the
review page's one-ROI corrections hold ~70,000). Per round, the seconds to write (`write_rtstruct`:
trace, build, save) and to file-check (`pipeline.file_check.check_file`: read back, rasterise, Dice,
references), twice: for a first result (nothing traced or rasterised before in the process) and for a
revision (the result before it written and checked, then one ROI grown on 3 slices, as a click does).
Median over `--rounds`. It runs on older code too (to compare): there every write is a first one.

    nice -n 10 .venv/bin/python bench/rtstruct_write.py [--slices 100] [--rounds 5] [--profile]

Prints a table; writes bench/results/rtstruct_write.json. `--profile` prints the top of a cProfile of
one write + check.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from phantoms import write_series  # noqa: E402


def masks(shape: tuple[int, int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Three structures: 'Organ' (a hole on the middle third of its slices), 'Pair' (two pieces per slice),
    'Body' (an irregular outline)."""
    from scipy import ndimage

    nz, ny, nx = shape
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:nz, :ny, :nx]
    organ = ((y - 220) / 70.0) ** 2 + ((x - 300) / 90.0) ** 2 + ((z - nz / 2) / (nz / 2.2)) ** 2 <= 1
    hole = ((y - 220) / 18.0) ** 2 + ((x - 300) / 25.0) ** 2 <= 1
    organ[nz // 3: 2 * nz // 3] &= ~hole[0]
    pair = (((y - 330) / 30.0) ** 2 + ((x - 180) / 28.0) ** 2 <= 1) | (((y - 330) / 30.0) ** 2 + ((x - 340) / 28.0) ** 2 <= 1)
    pair = np.broadcast_to(pair, shape) & (np.abs(z - nz / 2) < nz * 0.4)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), (2.0, 12.0, 12.0))
    body = (((y - 256) / 190.0) ** 2 + ((x - 256) / 230.0) ** 2 + 0.05 * noise / noise.std()) <= 1
    return {"Organ": organ, "Pair": np.ascontiguousarray(pair), "Body": body}


def grown(mask: np.ndarray, seed: int) -> np.ndarray:
    """`mask` dilated by 3 voxels on 3 consecutive slices (what a reviewer's click changes)."""
    from scipy import ndimage

    on = np.flatnonzero(mask.any(axis=(1, 2)))
    z = int(on[len(on) // 3 + seed % 5])
    out = mask.copy()
    out[z:z + 3] = ndimage.binary_dilation(mask[z:z + 3], np.ones((1, 7, 7), bool))
    return out


def timed(rows: dict[str, list[float]], what: str, volume, rois, path: Path, settings) -> Path:
    """Write `rois` to `path` and file-check it; append the seconds to rows[what + '_write_s'|'_check_s'|...]."""
    from converters.rtstruct_write import write_rtstruct
    from pipeline.file_check import check_file

    t0 = time.perf_counter()
    path = write_rtstruct(volume, rois, path, settings, uid_seed="bench")
    t1 = time.perf_counter()
    check = check_file(path, volume, [roi.mask for roi in rois], 0.99)
    t2 = time.perf_counter()
    assert check.ok, check.problems
    rows[f"{what}_write_s"].append(t1 - t0)
    rows[f"{what}_check_s"].append(t2 - t1)
    rows[f"{what}_total_s"].append(t2 - t0)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one write + check")
    args = parser.parse_args()

    from config.schema import RTStructConfig
    from converters.rtstruct_write import RoiMask, build_rtstruct, write_rtstruct
    try:
        from converters.rtstruct_read import RASTERISED
        from converters.rtstruct_write import TRACED
        memos = [TRACED, RASTERISED]
    except ImportError:  # the code before the memos (to compare): nothing to clear
        memos = []
    from converters.series import read_series
    from pipeline.file_check import check_file

    load = round(os.getloadavg()[0], 2)
    shape = (args.slices, 512, 512)
    truth = masks(shape)
    with tempfile.TemporaryDirectory(prefix="rtprop-bench-rtstruct-") as tmp:
        root = Path(tmp)
        image = np.where(truth["Body"], 40, -1000).astype(np.int16)
        write_series(root / "ct", image, spacing=(0.9, 0.9, 2.0), origin=(-230.0, -230.0, 0.0), seed=1)
        volume = read_series(root / "ct")
        settings = RTStructConfig()
        rois = [RoiMask(name, m) for name, m in truth.items()]
        ds = build_rtstruct(volume, rois, settings, uid_seed="bench")
        contours = sum(len(rc.get("ContourSequence", [])) for rc in ds.ROIContourSequence)
        coords = sum(len(c.ContourData) for rc in ds.ROIContourSequence for c in rc.get("ContourSequence", []))
        rows: dict[str, list[float]] = {k: [] for k in ("cold_write_s", "cold_check_s", "cold_total_s",
                                                        "revision_write_s", "revision_check_s", "revision_total_s")}
        for r in range(args.rounds):
            # cold: nothing traced or rasterised before (the job's first result)
            for memo in memos:
                memo.clear()
            out = timed(rows, "cold", volume, rois, root / f"cold{r}.dcm", settings)
            # a revision: the result before it written and checked, then one ROI changed on 3 slices
            changed = grown(truth["Organ"], r)
            revised = [RoiMask(name, changed if name == "Organ" else m) for name, m in truth.items()]
            timed(rows, "revision", volume, revised, root / f"rev{r}.dcm", settings)
        size = out.stat().st_size
        if args.profile:
            for memo in memos:
                memo.clear()
            profiler = cProfile.Profile()
            profiler.enable()
            path = write_rtstruct(volume, rois, root / "profiled.dcm", settings, uid_seed="bench")
            check_file(path, volume, [roi.mask for roi in rois], 0.99)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)

    medians = {k: round(statistics.median(v), 3) for k, v in rows.items()}
    print(f"\nRTSTRUCT of {len(truth)} ROIs on a 512x512 CT of {args.slices} slices: {contours} contours, "
          f"{coords} coordinates, {size / 1e6:.2f} MB; load {load}; median of {args.rounds} rounds")
    print(f"{'stage':<32}{'median s':>10}{'min s':>10}{'max s':>10}")
    labels = {"cold_write_s": "first result: write", "cold_check_s": "first result: check",
              "cold_total_s": "first result: write + check", "revision_write_s": "revision: write",
              "revision_check_s": "revision: check", "revision_total_s": "revision: write + check"}
    for key, label in labels.items():
        print(f"{label:<32}{medians[key]:>10.3f}{min(rows[key]):>10.3f}{max(rows[key]):>10.3f}")
    result = {"slices": args.slices, "rois": len(truth), "contours": contours, "coordinates": coords,
              "bytes": size, "rounds": args.rounds, "load": load, "median_s": medians,
              "all_s": {k: [round(v, 4) for v in vs] for k, vs in rows.items()},
              "machine": platform.machine(), "python": platform.python_version(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out_json = REPO / "bench" / "results" / "rtstruct_write.json"
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_json.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
