"""Fine-tuning speed on this machine's CPU: seconds per optimizer step of SAM2 tiny (a benchmark, not a test).

Each configuration runs in its own subprocess (its peak RSS is its own): sam2 tiny with seeded
random weights (speed does not depend on the weights), 256 and 512 px, image encoder trained or
frozen, video mode (clips of --clip-frames slices through the memory path) and image mode (one
slice, jittered box). Data: synthetic CT phantoms of 512 x 512 slices written as NPZ, as
`rtprop finetune` feeds them. The first --warmup steps are not timed; the median of the rest is
reported, and the fastest: this machine is shared (other sessions' load shows as steps several times
slower than their neighbours), so the minimum is the uncontended figure and the estimate of a
clinic-sized fine-tune uses it, under stated assumptions (--patients, --rois-per-patient,
--samples-per-roi, --gpu-speedup). The load average before and after is recorded.

    nice -n 10 .venv/bin/python bench/finetune.py [--sizes 256,512] [--modes video,image] [--steps 8]
                                                  [--clip-frames 8] [--patients 200]
(the committed results: --clip-frames 4; 8-frame clips at 512 px with the encoder trained need ~12 GB)
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
RESULTS = REPO / "bench" / "results" / "finetune.json"


def write_data(folder: Path, volumes: int = 3, slices: int = 24, size: int = 512) -> None:
    """CT-like phantoms: body, an ellipsoidal organ over the middle slices, noise (HU), as MedSAM2-style NPZ."""
    from converters.geometry import Geometry, Volume
    from converters.volume_io import write_npz

    for seed in range(volumes):
        rng = np.random.default_rng(seed)
        z, y, x = np.ogrid[0:slices, 0:size, 0:size]
        body = ((y - size / 2) / (0.42 * size)) ** 2 + ((x - size / 2) / (0.46 * size)) ** 2 <= 1
        organ = (((z - slices / 2) / (0.3 * slices)) ** 2 + ((y - rng.uniform(0.4, 0.5) * size) / (0.1 * size)) ** 2
                 + ((x - rng.uniform(0.5, 0.6) * size) / (0.13 * size)) ** 2 <= 1)
        image = np.where(body, 20.0, -1000.0) + rng.normal(0, 15, (slices, size, size)) + 90.0 * organ
        volume = Volume(image.astype(np.float32), Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 2.0),
                                                           shape_zyx=image.shape), modality="CT",
                        study_instance_uid=f"1.2.826.0.1.3680043.8.498.{seed + 1}")
        write_npz(folder / f"phantom{seed}.npz", volume, organ.astype(np.uint8))


def work(args: dict) -> dict:
    """One configuration: `steps` optimizer steps, each step's wall time."""
    from config.schema import PropagationConfig
    from models.finetune import FinetuneSettings, npz_items, train

    folder = Path(args["data"])
    items = [i for p in sorted(folder.glob("*.npz")) for i in npz_items(p)]
    settings = FinetuneSettings(steps=args["steps"], image_size=args["size"], random_init=True, mode=args["mode"],
                                clip_frames=args["clip_frames"], freeze_image_encoder=args["frozen"],
                                device="cpu", cpu_threads=args["threads"], save_every=10 ** 6, lr=1e-4)
    marks = [time.perf_counter()]
    t0 = time.perf_counter()
    train(items, Path(args["out"]), settings, PropagationConfig(), progress=False,
          on_step=lambda step, loss: marks.append(time.perf_counter()))
    steps_s = list(np.diff(marks))
    timed = steps_s[args["warmup"]:] or steps_s
    return {"size": args["size"], "mode": args["mode"], "frozen_image_encoder": args["frozen"],
            "clip_frames": args["clip_frames"] if args["mode"] == "video" else 1, "steps": args["steps"],
            "s_per_step": float(np.median(timed)), "s_per_step_min": float(np.min(timed)),
            "s_per_step_all": [round(s, 2) for s in steps_s],
            "first_step_s": round(steps_s[0], 2), "build_and_total_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def run_worker(args: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(args)], capture_output=True, text=True,
                       env=env, cwd=str(REPO))
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def estimate(rows: list[dict], a: argparse.Namespace) -> list[dict]:
    """Time of a clinic fine-tune from the measured CPU step times (assumptions in the output)."""
    train_rois = a.patients * (1 - a.validation_fraction) * a.rois_per_patient
    steps = int(round(train_rois * a.samples_per_roi))
    out = []
    for r in rows:
        cpu_h = steps * r["s_per_step_min"] / 3600
        out.append({"size": r["size"], "mode": r["mode"], "frozen_image_encoder": r["frozen_image_encoder"],
                    "steps": steps, "cpu_hours": round(cpu_h, 1), "gpu_hours": round(cpu_h / a.gpu_speedup, 2)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--modes", default="video,image")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per configuration (>= warmup + 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clip-frames", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--patients", type=int, default=200)
    p.add_argument("--validation-fraction", type=float, default=0.2)
    p.add_argument("--rois-per-patient", type=float, default=2.0)
    p.add_argument("--samples-per-roi", type=float, default=20.0,
                   help="samples (clips or boxes) drawn per training ROI over the run, e.g. ~10 epochs x 2")
    p.add_argument("--gpu-speedup", type=float, default=50.0,
                   help="assumed speed-up of one data-centre GPU (bf16) over this CPU for the same step")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(work(json.loads(a.worker))))
        return
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "npz"
        data.mkdir()
        write_data(data)
        for size in (int(s) for s in a.sizes.split(",")):
            for mode in a.modes.split(","):
                for frozen in (False, True):
                    args = {"data": str(data), "size": size, "mode": mode, "frozen": frozen, "steps": a.steps,
                            "warmup": a.warmup, "clip_frames": a.clip_frames, "threads": a.threads,
                            "out": str(Path(tmp) / f"ft-{size}-{mode}-{int(frozen)}.pt")}
                    row = run_worker(args)
                    rows.append(row)
                    print(f"{size:>5} px  {mode:<6} clip {row['clip_frames']:>2}  image encoder "
                          f"{'frozen ' if frozen else 'trained'}  median {row['s_per_step']:6.2f}  min "
                          f"{row['s_per_step_min']:6.2f} s/step  "
                          f"(steps {row['s_per_step_all']})  peak {row['peak_rss_mb']:.0f} MB", flush=True)
    estimates = estimate(rows, a)
    print(f"\nEstimate for {a.patients} patients ({a.validation_fraction:.0%} held out, {a.rois_per_patient:g} ROIs "
          f"each, {a.samples_per_roi:g} samples per training ROI = {estimates[0]['steps']} steps), from the "
          f"fastest step; GPU = CPU / {a.gpu_speedup:g} (assumed):")
    for e in estimates:
        print(f"{e['size']:>5} px  {e['mode']:<6} image encoder {'frozen ' if e['frozen_image_encoder'] else 'trained'}"
              f"  CPU {e['cpu_hours']:8.1f} h   GPU {e['gpu_hours']:6.2f} h")
    result = {"host": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "torch_threads": a.threads,
                       "load_average_before": [round(v, 2) for v in load_before],
                       "load_average_after": [round(v, 2) for v in os.getloadavg()]},
              "command": " ".join(sys.argv), "steps": rows,
              "estimate": {"assumptions": {k: getattr(a, k) for k in ("patients", "validation_fraction",
                                                                       "rois_per_patient", "samples_per_roi",
                                                                       "gpu_speedup")},
                           "rows": estimates}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
