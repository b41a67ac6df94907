"""Time from a reviewer's correction to its new contour, weight-free backend (a benchmark, not a test).

The review page calls models.corrections.correct with the job's prompts, every correction so far and
the result before the newest one (`previous`): only the newest is applied. This measures that call on
a 512 x 512 CT of --slices (100) slices: totalseg-ct/dicom (20 slices, 0.98 mm pixels, 2 mm apart)
mirrored end to end (0..19, 18..0, 1..19, ...) with its organ labels likewise, so that large organs
span the whole series as on a clinical scan. For each organ spanning >= 5 slices (--only: some): a
box on its middle slice, then --clicks (5) clicks, each at the deepest point of the largest 3D error
(bench/quality.py --prompt boxclicks), each timed. Also timed: the same last correction without
`previous` (a full run), and its result compared with the incremental one (they must be equal), and
each result's hash (`result_sha256`: two versions of the code must give the same). Wall time and the
process's CPU time are both given: on a shared machine the wall time is the load's.

    nice -n 10 .venv/bin/python bench/corrections.py [--slices 100] [--clicks 5] [--only totalseg512_label5]
                                                    [--out bench/results/corrections.json] [--profile FILE]
--profile: cProfile the incremental corrections only (all cases together) into FILE (pstats) and print
where their time goes.
Target: the new contour within 1 s of the click, median.
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import json
import sys
import time
from pathlib import Path

import numpy as np

from config.schema import PropagationConfig
from models.corrections import correct
from models.prompts import Prompt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DEFAULT_DATA, REPO, error_click, make_prompts, totalseg512_cases  # noqa: E402

TARGET_S = 1.0


def mirrored(n_slices: int, count: int) -> np.ndarray:
    """Source slice of each of `count` slices, running 0..n-1 and back (no slice repeated at the turns)."""
    period = 2 * (n_slices - 1)
    return np.array([i % period if i % period < n_slices else period - i % period for i in range(count)])


def long_cases(data: Path, n_slices: int) -> list[dict]:
    """The 512 x 512 organs of bench/quality.py --cases totalseg512, on a series mirrored to `n_slices`."""
    cases = totalseg512_cases(data)
    index = mirrored(cases[0]["image"].shape[0], n_slices)
    image = np.ascontiguousarray(cases[0]["image"][index])
    return [dict(case, image=image, mask=np.ascontiguousarray(case["mask"][index])) for case in cases]


def digest(mask: np.ndarray, confidence: np.ndarray) -> str:
    """A short hash of a result (mask and per-slice confidence): runs of two versions of the code compare equal."""
    h = hashlib.sha256(np.packbits(np.asarray(mask, dtype=bool)).tobytes())
    h.update(np.asarray(confidence, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def time_case(case: dict, settings: PropagationConfig, clicks: int, profile: cProfile.Profile | None = None) -> dict:
    """Box, then `clicks` corrections each with `previous`; then the last one again without it.
    `profile`, if given, records the corrections with `previous` (not the first result, not the full run)."""
    image, reference, spacing, modality = case["image"], case["mask"], case["spacing"], case["modality"]
    prompts = make_prompts(reference, "box", spacing[1:])
    t0 = time.perf_counter()
    result = correct(image, spacing, prompts, [], modality, settings)
    row = {"structure": case["name"], "slices_in_gt": int(reference.any(axis=(1, 2)).sum()),
           "first_result_s": time.perf_counter() - t0, "correction_s": [], "correction_cpu_s": [],
           "incremental": [], "result_sha256": []}
    corrections: list[Prompt] = []
    taken: set[tuple[int, int, int]] = set()
    for _ in range(clicks):
        click = error_click(result.mask, reference, spacing, taken)
        if click is None:
            break
        corrections.append(click)
        if profile is not None:
            profile.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        result = correct(image, spacing, prompts, corrections, modality, settings, previous=result)
        if profile is not None:
            profile.disable()
        row["correction_s"].append(time.perf_counter() - t0)
        row["correction_cpu_s"].append(time.process_time() - c0)
        row["incremental"].append(bool(result.details.get("incremental")))
        row["result_sha256"].append(digest(result.mask, result.confidence))
    if corrections:
        t0 = time.perf_counter()
        full = correct(image, spacing, prompts, corrections, modality, settings)
        row["full_run_s"] = time.perf_counter() - t0
        row["full_equals_incremental"] = bool(np.array_equal(full.mask, result.mask)
                                              and np.array_equal(full.confidence, result.confidence))
    return row


def summarise(rows: list[dict], slices: int, load: tuple[float, float, float]) -> dict:
    """Median, 90th percentile and maximum over every correction of `rows`, wall and CPU time."""
    seconds = np.array([s for r in rows for s in r["correction_s"]])
    cpu = np.array([s for r in rows for s in r["correction_cpu_s"]])
    summary = {"series": f"totalseg-ct/dicom mirrored to {slices} slices, 512 x 512", "cases": len(rows),
               "corrections": int(seconds.size), "median_s": float(np.median(seconds)),
               "p90_s": float(np.percentile(seconds, 90)), "max_s": float(seconds.max()),
               "median_cpu_s": float(np.median(cpu)), "p90_cpu_s": float(np.percentile(cpu, 90)),
               "median_full_run_s": float(np.median([r["full_run_s"] for r in rows if "full_run_s" in r])),
               "all_incremental": all(all(r["incremental"]) for r in rows),
               "full_equals_incremental": all(r.get("full_equals_incremental", True) for r in rows),
               "target_median_s": TARGET_S, "load_average_at_start": [round(v, 2) for v in load],
               "load_average_at_end": [round(v, 2) for v in os.getloadavg()]}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--slices", type=int, default=100, help="slices of the mirrored series (default 100)")
    parser.add_argument("--clicks", type=int, default=5, help="corrections per organ (default 5)")
    parser.add_argument("--only", default="", help="comma-separated structure names (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "corrections.json")
    parser.add_argument("--profile", type=Path, help="cProfile the incremental corrections into this file")
    args = parser.parse_args(argv)
    load = os.getloadavg()  # the 2-core machine is shared: the wall times depend on it
    profile = cProfile.Profile() if args.profile else None

    settings = PropagationConfig(backend="classic")
    cases = long_cases(args.data, args.slices)
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c["name"] in wanted]
    rows = []
    print(f"{'structure':24s} {'slices':>6s} {'first s':>8s}  {'each correction, s':30s} {'full s':>7s}  same")
    for case in cases:
        row = time_case(case, settings, args.clicks, profile)
        rows.append(row)
        print(f"{row['structure']:24s} {row['slices_in_gt']:6d} {row['first_result_s']:8.2f}  "
              f"{' '.join(f'{s:.2f}' for s in row['correction_s']):30s} {row.get('full_run_s', 0.0):7.2f}  "
              f"{row.get('full_equals_incremental')}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after every case: a run stopped early keeps its cases
        args.out.write_text(json.dumps({"summary": summarise(rows, args.slices, load), "cases": rows}, indent=2))
    summary = summarise(rows, args.slices, load)
    print(f"corrections {summary['corrections']}: median {summary['median_s']:.2f} s, 90th percentile "
          f"{summary['p90_s']:.2f} s, max {summary['max_s']:.2f} s (target median <= {TARGET_S:.0f} s); CPU time "
          f"median {summary['median_cpu_s']:.2f} s, 90th percentile {summary['p90_cpu_s']:.2f} s; "
          f"full run median {summary['median_full_run_s']:.2f} s; incremental == full run: "
          f"{summary['full_equals_incremental']}")
    print(f"load average (1, 5, 15 min) at start {summary['load_average_at_start']}, at end "
          f"{summary['load_average_at_end']}")
    if profile is not None:
        profile.dump_stats(args.profile)
        pstats.Stats(str(args.profile)).sort_stats("cumulative").print_stats(40)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "cases": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
