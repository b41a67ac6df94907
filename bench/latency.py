"""Latency a planner waits at the TPS: seconds from DCMTK storescu's return (the last image and the prompt sent,
one association) to the propagated RTSTRUCT stored at a DCMTK storescp playing the TPS; median of 5.

The node is `rtprop serve` on the default configuration (backend auto: the weight-free classic propagator without
a checkpoint; series_quiet_period_s 10 s; complete_on_release off), warm: one case is sent and delivered before
the clock runs. The case is the real sts-001 sarcoma CT (59 slices of 3.27 mm, cropped) resampled to
512 x 512 pixels and 118 slices of 1.635 mm (linear interpolation: real anatomy at a clinical CT's size, not new
information), written as DICOM with fresh UIDs for every run, and a box prompt on the GTV's middle slice drawn
from the clinician's contour. Three cases:

  listing   the prompt's structure set lists every image (as TPS exports do), sent after the images;
  first     the same prompt sent first, in an association of its own; the clock starts when the images' ends;
  own       the prompt lists only its own slice: the quiet period completes the series (the job says so).

    nice -n 10 .venv/bin/python bench/latency.py [--runs 5] [--cases listing first own] [--compare DIR]

`--compare DIR` runs a second node on the code checked out in DIR beside this tree's, one run each in turn,
so that on a shared machine an old and a new version are measured under the same load.

Prints a table with where the time went (from the job's audit timeline and its timings); writes
bench/results/latency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from node_helpers import NodeProcess, StoreSCP, storescu, wait_for  # noqa: E402

STS = Path(os.environ.get("RTPROP_SHARED", REPO.parent / "shared")) / "data" / "sts-001" / "CT"
SLICES, PIXELS = 118, 512


def resampled_sts() -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float], dict]:
    """The sts-001 CT at 512 x 512 x 118 (HU), its spacing (x, y, z mm), origin, and the GTV box prompt."""
    from scipy import ndimage

    from converters.rtstruct_read import read_rtstruct
    from converters.series import read_series

    volume = read_series(STS / "image")
    gtv = read_rtstruct(next((STS / "rtstruct").iterdir()), volume).rois[0].mask
    nz, ny, nx = volume.array.shape
    zoom = (SLICES / nz, PIXELS / ny, PIXELS / nx)
    array = ndimage.zoom(volume.array.astype(np.float32), zoom, order=1)
    mask = ndimage.zoom(gtv.astype(np.uint8), zoom, order=0).astype(bool)
    sx, sy, sz = volume.geometry.spacing_mm
    spacing = (sx * nx / PIXELS, sy * ny / PIXELS, sz * (nz - 1) / (SLICES - 1))
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    z = int(zs[len(zs) // 2])
    rows, cols = np.flatnonzero(mask[z].any(axis=1)), np.flatnonzero(mask[z].any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
    return array, spacing, tuple(float(v) for v in volume.geometry.origin_mm), {"slice": z, "box": box}


def write_case(folder: Path, array, spacing, origin, prompt: dict, run: str, list_only_contoured: bool) -> list[Path]:
    """The CT with fresh UIDs and its prompt RTSTRUCT (last in the list)."""
    from converters.series import read_series
    from phantoms import write_series
    from pipeline_helpers import make_prompt_rtstruct

    shutil.rmtree(folder, ignore_errors=True)
    images = write_series(folder / "ct", array, spacing=spacing, origin=origin, patient_id=f"LAT{run}", seed=0)
    volume = read_series(folder / "ct")
    rs = make_prompt_rtstruct(volume, folder / "RS_prompt.dcm", boxes=[("GTV", prompt["slice"], prompt["box"])],
                              list_only_contoured=list_only_contoured)
    return [*images, rs]


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def timeline(node: NodeProcess, series_uid: str, sent_at: float) -> dict:
    """Seconds between the steps after storescu's return (`sent_at`, wall clock), from the job's audit rows, and
    inside its computation (the job's timings)."""
    rows = node.query("select event, at, details from audit where (series_instance_uid = ? and event = "
                      "'series.complete') or job_id = (select id from jobs where series_instance_uid = ?) order by id",
                      (series_uid, series_uid))
    first = {"sent": (sent_at, {})}
    for event, at, details in rows:
        first.setdefault(event, (_at(at), json.loads(details)))
    job = node.query("select timings_s from jobs where series_instance_uid = ?", (series_uid,))
    timings = json.loads(job[0][0]) if job and job[0][0] else {}

    def span(a: str, b: str) -> float | None:
        return round(first[b][0] - first[a][0], 3) if a in first and b in first else None

    inside = sum(timings.get(k, 0) for k in ("read_s", "propagate_s", "write_s", "file_check_s"))
    queued = first.get("job.queued", (0, {}))[1]
    claimed_to_propagated = span("job.claimed", "job.propagated")
    return {
        "completed_by": queued.get("series_completed_by", ""),
        "sent_to_series_complete_s": span("sent", "series.complete"),
        "series_complete_to_queued_s (job made, prompts found)": span("series.complete", "job.queued"),
        "queued_to_claimed_s": span("job.queued", "job.claimed"),
        "claimed_to_propagated_s": claimed_to_propagated,
        "  outside the computation: process start, imports, task, audit (claimed_to_propagated - compute)":
            round(claimed_to_propagated - inside, 3) if claimed_to_propagated else None,
        "  compute process (pid, its nth job; none: a process per job)": first.get("job.propagated", (0, {}))[1]
            .get("process"),
        "  compute read_s": timings.get("read_s"), "  propagate_s": timings.get("propagate_s"),
        "  write_s": timings.get("write_s"), "  file_check_s": timings.get("file_check_s"),
        "propagated_to_sending_s": span("job.propagated", "job.sending"),
        "sent_to_propagated_s": span("sent", "job.propagated"),
        "sending_to_sent_s (the job marked sent by bookkeeping, after the file is at the TPS)":
            span("job.sending", "job.sent"),
    }


def one_run(node: NodeProcess, tps: StoreSCP, work: Path, data, case: str, run: str) -> dict:
    files = write_case(work / "case", *data, run=run, list_only_contoured=case == "own")
    images, prompt = files[:-1], files[-1]
    from pydicom import dcmread

    series_uid = str(dcmread(images[0], stop_before_pixels=True).SeriesInstanceUID)
    before = len(tps.files())
    load = os.getloadavg()[0]  # the machine is shared: what else ran while this case did
    if case == "first":
        storescu(node.port, [prompt])
        storescu(node.port, images)
    else:
        storescu(node.port, [*images, prompt])
    t0, sent_at = time.monotonic(), time.time()
    wait_for(lambda: len(tps.files()) > before, 180, 0.02, what="the RTSTRUCT at the TPS")
    seconds = time.monotonic() - t0
    wait_for(lambda: node.query("select state from jobs where series_instance_uid = ?", (series_uid,)) ==
             [("sent",)], 30, 0.1, what="the job sent")
    steps = timeline(node, series_uid, sent_at)
    done = steps["sent_to_propagated_s"]
    return {"seconds": round(seconds, 3), "load_average_1min": round(load, 2), **steps,
            "propagated_to_at_tps_s (sender woken or polling, C-STORE)": round(seconds - done, 3) if done else None}


def start_node(root: Path, tps: StoreSCP, code: Path | None) -> NodeProcess:
    """`rtprop serve` on the default configuration, running this tree's code or the checkout at `code`."""
    saved = os.environ.get("PYTHONPATH")
    if code is not None:  # ahead of the venv's own path to this tree (its spawned children inherit it)
        os.environ["PYTHONPATH"] = str(code.resolve())
    try:
        return NodeProcess(root, destination=f"TPS@127.0.0.1:{tps.port}").start()
    finally:
        if code is not None:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    return {case: {"median_s": statistics.median(r["seconds"] for r in runs),
                   "runs_s": [r["seconds"] for r in runs],
                   "load_average_1min": [r["load_average_1min"] for r in runs],
                   "completed_by": sorted({r["completed_by"] for r in runs}),
                   "median_run": sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]}
            for case, runs in results.items()}


def print_summary(label: str, summary: dict[str, dict]) -> None:
    print(f"\n{label}\n| case | median s | runs s | load (1 min) | series completed by |\n| --- | --- | --- | --- | --- |")
    for case, s in summary.items():
        print(f"| {case} | {s['median_s']:.1f} | {', '.join(f'{v:.1f}' for v in s['runs_s'])} | "
              f"{', '.join(f'{v:.1f}' for v in s['load_average_1min'])} | {', '.join(s['completed_by'])} |")
    for case, s in summary.items():
        print(f"\nwhere the time went, median run of '{case}' ({label}):")
        for k, v in s["median_run"].items():
            print(f"  {k}: {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cases", nargs="+", default=["listing", "first", "own"], choices=["listing", "first", "own"])
    ap.add_argument("--compare", type=Path, help="also run the code checked out in this folder (e.g. "
                    "`git archive main | tar -x -C /tmp/before`), alternating run by run with this tree's: on a "
                    "shared machine both then see the same load")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latency.json")
    a = ap.parse_args()
    data = resampled_sts()
    load_at_start = os.getloadavg()
    codes: dict[str, Path | None] = {"this": None, **({"compare": a.compare} if a.compare else {})}
    results: dict[str, dict[str, list[dict]]] = {label: {} for label in codes}
    with tempfile.TemporaryDirectory(prefix="rtprop-latency-") as tmp:
        tmp = Path(tmp)
        tps = StoreSCP(tmp / "tps").start()
        nodes: dict[str, NodeProcess] = {}
        try:
            for label, code in codes.items():
                nodes[label] = start_node(tmp / label / "node", tps, code)
                warm = one_run(nodes[label], tps, tmp / label, data, "listing", f"{label}warm")
                print(f"{label}: warm-up {warm['seconds']} s", flush=True)
            for case in a.cases:
                for r in range(a.runs):
                    for label, node in nodes.items():
                        result = one_run(node, tps, tmp / label, data, case, f"{label}{case}{r}")
                        results[label].setdefault(case, []).append(result)
                        print(f"{label}: {case} run {r + 1}: {result['seconds']} s (series completed by "
                              f"{result['completed_by']}; load {result['load_average_1min']})", flush=True)
        finally:
            for node in nodes.values():
                node.stop()
            tps.stop()
    summary = {label: summarise(runs) for label, runs in results.items()}
    out = {"case": f"sts-001 CT resampled to {PIXELS}x{PIXELS}x{SLICES}, box prompt on the GTV's middle slice",
           "node": "rtprop serve, default configuration (classic backend, quiet period 10 s), warm",
           "clock": "storescu's return (images and prompt sent) -> the RTSTRUCT stored at DCMTK storescp",
           "results": summary["this"], "runs": results["this"], "machine": platform.platform(),
           "cpus": os.cpu_count(), "load_average_at_start": load_at_start,
           "load_average": os.getloadavg(), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if a.compare:
        out.update(compare={"code": str(a.compare), "results": summary["compare"], "runs": results["compare"]},
                   alternated="each run of this tree's node was followed by one of the compared code's")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    for label, s in summary.items():
        print_summary(label if label == "this" else f"compare ({a.compare})", s)
    print(f"({a.out})")


if __name__ == "__main__":
    main()
