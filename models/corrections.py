"""Corrections a reviewer adds to a result: more prompts on any slice, and where the structure ends.

A correction is a prompt (`BoxPrompt`, `PointPrompt`, `MaskPrompt` on one slice) or an `Extent`.
`correct` gives the result of a structure's prompts plus its corrections, in the order they were made.

- classic: the prompts' result, then each correction in turn changes its own slice and is carried
  outward only as far as it changes the result (`models.classic.Correcting`); an extent cuts the
  result to it and carries it on to it where it stopped short. A correction that finds nothing, or
  would empty a slice a positive prompt is on, is recorded (`details["corrections_applied"]`, a
  warning), not a refusal of the whole result. Given the result of the same image, prompts,
  settings and all corrections but the newest (`previous`, as `correct` returned it: its
  `details["correction_state"]` holds a fingerprint of what it was made from, and the slices the
  prompts set), only the newest is applied: the same result as a full run, in the time of one
  correction. Keep the returned result (its details with it) to pass as the next `previous`; a result
  held otherwise (a job's result read back from its RTSTRUCT) is made one with `as_result_of`.
- sam2: the video predictor's own way: a correction on a prompted slice changes that prompt (a click
  joins the box, a box or an outline replaces it); the others are added on their frames after a
  first run (clicks and a box with `add_new_points_or_box`, an outline with `add_new_mask`) and
  propagation is run again (models/sam2_backend.py); an extent cuts the result to it.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from config.schema import PropagationConfig
from models import backends, classic, guard
from models.intensity_model import slice_features
from models.prompts import (
    BoxPrompt,
    MaskPrompt,
    PointPrompt,
    Prompt,
    PromptError,
    check_prompt,
    check_prompts,
    is_positive,
)
from models.result import PropagationResult


@dataclass(frozen=True)
class Extent:
    """The structure runs from slice `first` to slice `last` (inclusive voxel indices) and no further."""

    first: int
    last: int


Correction = Prompt | Extent


def check_extent(n_slices: int, extent: Extent, prompts: Sequence[Prompt]) -> None:
    """Refuse an extent outside the series, inverted, or leaving out a slice the planner prompted."""
    if not 0 <= extent.first <= extent.last < n_slices:
        raise PromptError(f"extent {extent.first}..{extent.last} must satisfy 0 <= first <= last <= {n_slices - 1}")
    outside = sorted({p.slice_index for p in prompts
                      if is_positive(p) and not extent.first <= p.slice_index <= extent.last})
    if outside:
        raise PromptError(f"extent {extent.first}..{extent.last} leaves out prompted slice(s) {outside}")


def effective_prompts(prompts: Sequence[Prompt], corrections: Sequence[Correction]) -> list[Prompt]:
    """The prompts and the prompt corrections as one set, newest word per slice: a box or an outline
    replaces what was drawn and clicked on its slice before it; clicks add to what is there."""
    by_slice: dict[int, list[Prompt]] = {}
    for prompt in [*prompts, *(c for c in corrections if not isinstance(c, Extent))]:
        here = by_slice.setdefault(prompt.slice_index, [])
        if isinstance(prompt, (BoxPrompt, MaskPrompt)):
            here.clear()
        here.append(prompt)
    return [p for z in sorted(by_slice) for p in by_slice[z]]


def correct(image: np.ndarray, spacing_zyx: tuple[float, float, float], prompts: Sequence[Prompt],
            corrections: Sequence[Correction], modality: str = "", settings: PropagationConfig | None = None,
            previous: PropagationResult | None = None) -> PropagationResult:
    """The result of `prompts` plus `corrections` (in the order they were made; the last extent wins).

    `previous`: the result `correct` gave for the same image, prompts and settings and all corrections
    but the last (None: none yet); the classic backend then applies only the last correction. A
    `previous` made otherwise is not used (its fingerprint does not match): the result is then computed
    in full, never from a stale state. Raises PromptError naming a correction that cannot be used.
    """
    settings = settings or PropagationConfig()
    image = np.asarray(image)
    checked = check_prompts(image.shape, spacing_zyx, prompts)
    _check_corrections(image.shape, spacing_zyx, checked, corrections)
    effective = check_prompts(image.shape, spacing_zyx, effective_prompts(checked, corrections))
    backend = backends.choose(settings)
    extents = [c for c in corrections if isinstance(c, Extent)]
    own_way = backend.correct()
    if own_way is not None:  # classic: the prompts in their own order (with clicks only, the first one starts)
        given = (prompts,) if isinstance(prompts, (BoxPrompt, PointPrompt, MaskPrompt)) else tuple(prompts)
        result = own_way(image, spacing_zyx, given, corrections, modality, settings, previous)
    else:  # sam2: corrections on the prompts' own slices change those prompts; the others are added after a first run
        prompted = {p.slice_index for p in checked}
        here = [c for c in corrections if not isinstance(c, Extent) and c.slice_index in prompted]
        later = [c for c in corrections if not isinstance(c, Extent) and c.slice_index not in prompted]
        result = backend.propagate()(image, spacing_zyx, effective_prompts(checked, here), modality, settings,
                                           corrections=later)
        if extents:
            outside = np.ones(image.shape[0], dtype=bool)
            outside[extents[-1].first:extents[-1].last + 1] = False
            result.mask[outside] = False
            result.confidence = np.where(outside, 0.0, result.confidence).astype(np.float32)
    result.warnings = guard.assess(image, spacing_zyx, effective, result, modality) + _not_applied(result)
    return result


def _check_corrections(shape: tuple[int, ...], spacing_zyx: tuple[float, float, float], prompts: Sequence[Prompt],
                       corrections: Sequence[Correction]) -> None:
    """Each correction fits the image (a click may be negative only); an extent keeps every prompted slice."""
    for i, c in enumerate(corrections):
        try:
            if isinstance(c, Extent):
                check_extent(shape[0], c, prompts)
            else:
                check_prompt(shape, spacing_zyx, c, negative_only_ok=True)
        except PromptError as exc:
            raise PromptError(f"correction {i + 1}: {exc}") from exc


def fingerprint(image: np.ndarray, spacing_zyx: tuple[float, float, float], prompts: Sequence[Prompt],
                corrections: Sequence[Correction], modality: str, settings: PropagationConfig) -> str:
    """What a result was made from (image shape, spacing, a sample of its voxels, prompts, corrections,
    settings), so that a `previous` result is used only for what it is."""
    h = hashlib.sha256()
    h.update(repr((image.shape, tuple(float(s) for s in spacing_zyx), modality)).encode())
    h.update(np.ascontiguousarray(image[:, ::17, ::13]).tobytes())
    h.update(settings.model_dump_json().encode())
    for item in [*prompts, None, *corrections]:
        if isinstance(item, MaskPrompt):
            h.update(f"mask {item.slice_index}".encode() + np.packbits(np.asarray(item.mask, dtype=bool)).tobytes())
        else:
            h.update(repr(item).encode())
    return h.hexdigest()


def as_result_of(result: PropagationResult, image: np.ndarray, spacing_zyx: tuple[float, float, float],
                 prompts: Sequence[Prompt], modality: str = "", settings: PropagationConfig | None = None
                 ) -> PropagationResult:
    """`result` taken as the result of `prompts` with no correction yet: a copy whose details let `correct`
    apply a first correction to it (classic) instead of propagating the prompts again. For a result the
    caller holds as it was shown and sent (a job's result read back from its RTSTRUCT): the correction then
    changes what the reviewer saw, and costs one correction's time. (`correct`'s own results carry this already.)"""
    settings = settings or PropagationConfig()
    given = (prompts,) if isinstance(prompts, (BoxPrompt, PointPrompt, MaskPrompt)) else tuple(prompts)
    state = {"key": fingerprint(np.asarray(image), spacing_zyx, given, [], modality, settings),
             "locked": sorted({int(p.slice_index) for p in given}),
             "held": sorted({int(p.slice_index) for p in given if is_positive(p)}),
             "extent": [0, int(np.shape(image)[0]) - 1]}
    details = {k: v for k, v in result.details.items() if k not in ("correction_state", "corrections_applied")}
    return replace(result, details={**details, "correction_state": state})


def correct_incrementally(image: np.ndarray, spacing_zyx: tuple[float, float, float], prompts: Sequence[Prompt],
                          corrections: Sequence[Correction], modality: str, settings: PropagationConfig,
                          previous: PropagationResult | None) -> PropagationResult:
    """The classic backend's corrections: from a matching `previous`, only the newest one (module docstring)."""
    t_start = time.perf_counter()
    key = fingerprint(image, spacing_zyx, prompts, corrections, modality, settings)
    state = (previous.details.get("correction_state") if previous is not None else None) or {}
    resume = bool(corrections) and state.get("key") == fingerprint(image, spacing_zyx, prompts, corrections[:-1],
                                                                   modality, settings)
    if resume:
        base, todo, records = previous, corrections[-1:], list(previous.details.get("corrections_applied", []))
        work = classic.Correcting.start(image, spacing_zyx, base.mask, base.confidence, state["locked"],
                                        state["held"], modality, settings, tuple(state["extent"]),
                                        features=_kept_features(image, modality))
    else:
        base = classic.propagate(image, spacing_zyx, prompts, modality, settings)
        todo, records = corrections, []
        work = classic.Correcting.start(image, spacing_zyx, base.mask, base.confidence,
                                        [p.slice_index for p in prompts],
                                        [p.slice_index for p in prompts if is_positive(p)], modality, settings,
                                        features=_kept_features(image, modality))
    for c in todo:
        records.append(work.limit(c.first, c.last) if isinstance(c, Extent) else work.add(c))
    details: dict[str, Any] = {k: v for k, v in base.details.items() if k not in ("correction_state", "timings_s")}
    seconds = time.perf_counter() - t_start
    details.update(corrections_applied=records, incremental=resume,
                   timings_s={"total": seconds, "per_slice": seconds / max(work.chain.visited, 1)},
                   correction_state={"key": key, "locked": sorted(work.locked), "held": sorted(work.held),
                                     "extent": [work.first, work.last]})
    return PropagationResult(mask=work.mask, confidence=work.confidence, backend=base.backend, details=details)


_KEPT: list[tuple[tuple, Callable[[int], np.ndarray]]] = []  # the last image's slice features (see below)
_KEPT_LOCK = threading.Lock()


def _kept_features(image: np.ndarray, modality: str) -> Callable[[int], np.ndarray]:
    """`intensity_model.slice_features` of `image`, kept for the next correction of the same image (a reviewer
    corrects one series a click at a time: each slice's features are computed once, not once per click).
    Only the last image's are kept (with the image itself, until another is corrected); the same array object
    with the same shape, type and voxel sample."""
    sample = hashlib.sha256(np.ascontiguousarray(image[:, ::17, ::13]).tobytes()).hexdigest()
    key = (id(image), image.shape, image.dtype.str, modality, sample)
    with _KEPT_LOCK:
        if _KEPT and _KEPT[0][0] == key:
            return _KEPT[0][1]
        features = slice_features(image, modality)
        _KEPT[:] = [(key, features)]
        return features


def _not_applied(result: PropagationResult) -> list[str]:
    """A warning for each correction that found nothing or fell outside the extent (recorded, not refused)."""
    return [f"the correction on slice {r['slice']} was not applied: {r['applied']}"
            for r in result.details.get("corrections_applied", [])
            if r.get("applied") not in ("changed", "no change", None)]
