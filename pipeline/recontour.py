"""Re-contour one ROI: prompt from its middle slice, propagate, write a new RTSTRUCT and metrics.

The same steps serve `rtprop recontour`, `rtprop demo` and the nightly batch.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from config.schema import Config
from converters.rtstruct_read import read_rtstruct
from converters.rtstruct_write import RoiMask, write_rtstruct
from converters.series import read_series
from models.propagate import propagate
from pipeline.metrics import evaluate_masks
from pipeline.prompts import prompt_from_roi


def recontour(series_dir: Path, rtstruct: Path, roi_name: str, prompt_kind: str, out_dir: Path,
              config: Config, uid_seed: str | None = None) -> dict[str, Any]:
    """Run the whole re-contouring of one ROI; returns the summary also written to metrics.json.

    `uid_seed`: derive the new RTSTRUCT's UIDs from it (a batch item run twice writes the same instance)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    volume = read_series(series_dir)
    structure_set = read_rtstruct(rtstruct, volume)
    reference = structure_set.roi(roi_name)
    timings["read_s"] = time.perf_counter() - t0

    prompt = prompt_from_roi(reference.mask, prompt_kind)
    t1 = time.perf_counter()
    result = propagate(volume.array, volume.geometry.spacing_zyx, prompt, volume.modality, config.propagation)
    timings["propagate_s"] = time.perf_counter() - t1

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t2 = time.perf_counter()
    # the writer appends the configured suffix to the ROI name
    out_path = write_rtstruct(volume, [RoiMask(reference.name, result.mask)], out_dir / "RS_rtprop.dcm", config.rtstruct,
                              uid_seed=uid_seed)
    timings["write_s"] = time.perf_counter() - t2

    metrics = evaluate_masks(result.mask, reference.mask, volume.geometry.spacing_zyx)
    summary = {
        "series_instance_uid": volume.series_instance_uid,
        "roi": reference.name,
        "prompt": prompt_kind,
        "key_slice": prompt.slice_index,
        "backend": result.backend,
        "confidence": round(float(result.structure_confidence), 3),
        "checkpoint_sha256": result.checkpoint_sha256,
        "rtstruct": str(out_path),
        "metrics": metrics,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary
