"""Propagation and cine-tracking speed and memory (a benchmark, not a test).

Each measurement runs in its own subprocess so its peak RSS (ru_maxrss) is its own.

1. Volume propagation, synthetic CT phantom (512 x 512, --slices slices, 2 mm): seconds per slice
   and peak RSS for the classic backend and SAM2 tiny (random weights: speed only, never accuracy)
   at 256/512/1024 px; SAM2's slice count is small by default (--sam2-slices, CPU: ~0.5-5 s a slice)
   and the 100-slice time is extrapolated from it, marked as such.
   SAM2 overhead = (our propagate per slice) / (sam2's bare propagate_in_video per slice on
   preloaded tensors, no stop rules, no post-processing) - 1.
2. Cine classic tracking on a 270 x 270 respiratory phantom (4 Hz, 4 s period, 15 mm) read from a
   TrackRAD-layout .mha: ms per frame end to end (frame read + tracking + label/CSV writing); the
   one-off transposition of the .mha when it is opened is reported apart.
3. Cine memory: a TrackRAD-layout .mha of 500 and of --long-frames frames (written first by another
   subprocess), read by the streaming reader, tracked, written: peak RSS of each run.

    .venv/bin/python bench/propagate.py [--slices 100] [--sam2-slices 8,6,3] [--sizes 256,512,1024]
                                        [--cine-frames 500] [--long-frames 5000] [--skip-sam2]
Targets: classic <= 0.05 s/slice; SAM2 overhead <= 20 %; cine <= 40 ms/frame; long-cine peak <= 1.2x.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "propagate.json"


def ct_phantom(n_slices: int, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Body (soft tissue) with an ellipsoidal organ across the middle ~60 % of the slices, noise; HU."""
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[0:n_slices, 0:size, 0:size]
    body = ((y - size / 2) / (0.42 * size)) ** 2 + ((x - size / 2) / (0.46 * size)) ** 2 <= 1
    image = np.where(body, 20.0, -1000.0).astype(np.float32) + rng.normal(0, 15, (n_slices, size, size)).astype(np.float32)
    zc, half = (n_slices - 1) / 2, max(n_slices * 0.3, 1.5)
    organ = ((z - zc) / half) ** 2 + ((y - 0.45 * size) / (0.12 * size)) ** 2 + ((x - 0.55 * size) / (0.15 * size)) ** 2 <= 1
    image[organ] += 90.0
    return image, organ


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- workers (subprocesses)
def work_classic(args: dict) -> dict:
    from config.schema import PropagationConfig
    from models.prompts import BoxPrompt
    from models.propagate import propagate

    t_import = time.perf_counter()
    import models.classic  # noqa: F401  the backend's imports (OpenCV, SimpleITK): once per process, timed apart
    import_s = time.perf_counter() - t_import
    image, organ = ct_phantom(args["slices"])
    k = args["slices"] // 2
    rows, cols = np.nonzero(organ[k])
    prompt = BoxPrompt(k, int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
    t0 = time.perf_counter()
    result = propagate(image, (2.0, 0.8, 0.8), prompt, "CT", PropagationConfig(backend="classic"))
    wall = time.perf_counter() - t0
    slices = sum(s["slices"] for s in result.details["stop"].values())
    return {"slices_processed": slices, "s_per_slice": wall / max(slices + 1, 1), "wall_s": wall,
            "import_s": import_s, "peak_rss_mb": peak_rss_mb()}


def work_sam2(args: dict) -> dict:
    import torch

    from config.schema import PropagationConfig
    from models import sam2_backend
    from models.device import inference_context
    from models.prompts import MaskPrompt
    from models.sam2_loader import load_model
    from models.sam2_video import LazyFrames, init_state_in_memory, to_model_input

    size, n = args["size"], args["slices"]
    image, organ = ct_phantom(n)
    loaded = load_model("tiny", None, size, "cpu", 2, seed=0)
    settings = PropagationConfig(backend="sam2", sam2={"image_size": size}, device="cpu", min_area_fraction=0.0)
    key = np.ones(image.shape[1:], bool)  # random weights: a full key mask keeps junk from stopping early
    sam2_backend.propagate(image[:2], (2.0, 0.8, 0.8), MaskPrompt(0, key), "CT", settings, loaded=loaded)  # warm-up
    t0 = time.perf_counter()
    result = sam2_backend.propagate(image, (2.0, 0.8, 0.8), MaskPrompt(0, key), "CT", settings, loaded=loaded)
    ours_wall = time.perf_counter() - t0
    slices = len(result.details["frames_visited"]["increasing_z"])
    rss_ours = peak_rss_mb()
    # sam2 bare: its own propagate_in_video on frames preloaded as one tensor, no stop rules/post-processing
    norm = sam2_backend.preprocess(image, "CT", settings)
    predictor = loaded.model
    with inference_context(loaded.device):
        t0 = time.perf_counter()  # bare includes making the frames and the key frame, as ours does
        state = init_state_in_memory(predictor, LazyFrames(lambda i: norm[i], slices + 1, size), *image.shape[1:])
        state["images"] = torch.stack([to_model_input(norm[i], size) for i in range(slices + 1)])
        state["num_frames"] = slices + 1
        predictor.add_new_mask(state, frame_idx=0, obj_id=1, mask=torch.from_numpy(key))
        for _ in predictor.propagate_in_video(state, start_frame_idx=0):
            pass
        bare_wall = time.perf_counter() - t0
    ours = ours_wall / max(slices, 1)
    bare = bare_wall / max(slices, 1)
    return {"slices_processed": slices, "s_per_slice": ours, "bare_s_per_slice": bare,
            "overhead_pct": 100.0 * (ours / bare - 1.0), "wall_s": ours_wall, "peak_rss_mb": rss_ours,
            "stop": {k: v["reason"] for k, v in result.details["stop"].items()}}


def work_cine(args: dict) -> dict:
    from config.schema import PropagationConfig
    from converters.cine import CineLabelWriter, MhaCine
    from phantoms import SyntheticCine
    from models.tracking import track

    settings = PropagationConfig(backend="classic")
    with tempfile.TemporaryDirectory() as out:
        if args.get("mha"):
            t_open = time.perf_counter()
            source = MhaCine(args["mha"], frame_rate_hz=4.0, tmp_dir=out)  # the one-pass transposition
            open_s = time.perf_counter() - t_open
            first = np.load(args["mha"] + ".first.npy")
        else:
            source = SyntheticCine(n_frames=args["frames"], shape=(270, 270), spacing_mm=1.5, amplitude_mm=15.0)
            first, open_s = source.truth(0), 0.0
        with source:
            writer = CineLabelWriter(out, source, case="bench")
            t0 = time.perf_counter()
            summary = track(source, first, settings, sink=lambda t, m, c, ms: writer.add(m, c, ms))
            t_track = time.perf_counter() - t0
            writer.close()
        return {"frames": source.n_frames, "ms_per_frame_end_to_end": 1000 * t_track / source.n_frames,
                "ms_per_frame_tracking_only": summary.latency_ms_mean, "p95_tracking_ms": summary.latency_ms_p95,
                "affine_frames": summary.details.get("affine_frames"), "open_transpose_s": open_s,
                "peak_rss_mb": peak_rss_mb()}


def work_write_mha(args: dict) -> dict:
    """Write a TrackRAD-layout frames .mha (time on the ITK x axis) of the phantom, plus its first label."""
    import SimpleITK as sitk

    from phantoms import SyntheticCine

    size = args.get("size", 128)
    source = SyntheticCine(n_frames=args["frames"], shape=(size, size), spacing_mm=2.0 * 128 / size, amplitude_mm=15.0)
    stack = np.empty((size, size, args["frames"]), np.float32)
    for t in range(args["frames"]):
        stack[..., t] = source.frame(t)
    sitk.WriteImage(sitk.GetImageFromArray(stack), args["mha"], useCompression=True)
    np.save(args["mha"] + ".first.npy", source.truth(0))
    return {"written": args["mha"]}


WORKERS = {"classic": work_classic, "sam2": work_sam2, "cine": work_cine, "write_mha": work_write_mha}


def run_worker(kind: str, **kwargs) -> dict:
    payload = json.dumps({"kind": kind, **kwargs})
    proc = subprocess.run([sys.executable, __file__, "--worker", payload], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    volume = parser.add_argument_group("volume propagation")
    volume.add_argument("--slices", type=int, default=100, help="slices of the 512x512 CT phantom (classic)")
    volume.add_argument("--sizes", default="256,512,1024", help="SAM2 input sizes to measure")
    volume.add_argument("--sam2-slices", default="8,6,3", help="slices per SAM2 size (CPU is slow; extrapolated)")
    volume.add_argument("--skip-sam2", action="store_true", help="classic and cine only")
    cine = parser.add_argument_group("cine tracking")
    cine.add_argument("--cine-frames", type=int, default=500, help="frames of the 270x270 speed phantom")
    cine.add_argument("--long-frames", type=int, default=5000, help="frames of the long memory run (vs 500)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args()

    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(WORKERS[job.pop("kind")](job)))
        return 0

    results: dict = {"host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "volume": [], "cine": {}}
    rows = []
    r = run_worker("classic", slices=args.slices)
    results["volume"].append({"backend": "classic", "size": 512, **r})
    rows.append(("classic", "-", r.get("slices_processed"), r.get("s_per_slice"), None, None, r.get("peak_rss_mb"),
                 f"+ {r['import_s']:.1f} s imports once per process" if "import_s" in r else ""))
    if not args.skip_sam2:
        sizes = [int(s) for s in args.sizes.split(",")]
        counts = [int(s) for s in args.sam2_slices.split(",")]
        for size, n in zip(sizes, counts + [counts[-1]] * (len(sizes) - len(counts))):
            r = run_worker("sam2", size=size, slices=n + 1)
            extrapolated = r.get("s_per_slice", float("nan")) * args.slices if "error" not in r else None
            results["volume"].append({"backend": "sam2 tiny (random weights)", "size": size,
                                      f"extrapolated_{args.slices}_slices_s": extrapolated, **r})
            rows.append((f"sam2 tiny {size}", size, r.get("slices_processed"), r.get("s_per_slice"),
                         r.get("bare_s_per_slice"), r.get("overhead_pct"), r.get("peak_rss_mb"),
                         f"{args.slices} slices ~{extrapolated:.0f} s (extrapolated)" if extrapolated else r.get("error", "")))
    print(f"\nVolume propagation, 512x512 CT phantom ({args.slices} slices for classic)")
    print(f"{'backend':<16}{'px':>6}{'slices':>8}{'s/slice':>10}{'bare s/sl':>11}{'overhead':>10}{'peak MB':>9}  note")
    for name, size, n, sps, bare, over, rss, note in rows:
        fmt = lambda v, f: (f.format(v) if isinstance(v, (int, float)) else "-")  # noqa: E731
        print(f"{name:<16}{size!s:>6}{fmt(n, '{:d}'):>8}{fmt(sps, '{:.3f}'):>10}{fmt(bare, '{:.3f}'):>11}"
              f"{fmt(over, '{:+.1f}%'):>10}{fmt(rss, '{:.0f}'):>9}  {note}")

    with tempfile.TemporaryDirectory() as tmp:
        mha = str(Path(tmp) / "cine_speed.mha")
        written = run_worker("write_mha", frames=args.cine_frames, mha=mha, size=270)
        speed = run_worker("cine", mha=mha) if "error" not in written else written
        results["cine"]["speed_270px"] = speed
        peaks = {}
        for frames in (500, args.long_frames):
            mha = str(Path(tmp) / f"cine_{frames}.mha")
            written = run_worker("write_mha", frames=frames, mha=mha)
            peaks[frames] = run_worker("cine", mha=mha) if "error" not in written else written
        results["cine"]["memory_128px"] = {str(k): v for k, v in peaks.items()}
    ratio = (peaks[args.long_frames].get("peak_rss_mb", float("nan")) / peaks[500].get("peak_rss_mb", float("nan")))
    results["cine"]["memory_ratio"] = ratio
    print(f"\nCine classic (ecc), 270x270 phantom, {speed.get('frames')} frames: "
          f"{speed.get('ms_per_frame_end_to_end', float('nan')):.1f} ms/frame end to end "
          f"(tracking alone {speed.get('ms_per_frame_tracking_only', float('nan')):.1f} ms, "
          f"p95 {speed.get('p95_tracking_ms', float('nan')):.1f} ms; affine stage on {speed.get('affine_frames')} of "
          f"{(speed.get('frames') or 1) - 1} frames); target <= 40 ms")
    print(f"Cine memory (128x128 .mha, streamed): 500 frames peak {peaks[500].get('peak_rss_mb', float('nan')):.0f} MB, "
          f"{args.long_frames} frames peak {peaks[args.long_frames].get('peak_rss_mb', float('nan')):.0f} MB "
          f"-> ratio {ratio:.2f} (target <= 1.2)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    raise SystemExit(main())
