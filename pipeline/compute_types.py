"""What crosses the process boundary between a worker and a job's computation, both ways, as frozen types.

The worker builds a `ComputeTask` (pipeline/runner.py `task_for`) and hands it to a child process
(pipeline/compute.py `run_child`, pickled); the child sends back a `ComputeResult` or a
`ComputeFailure`. Nothing else goes across: no dict whose keys a reader has to guess.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from config.schema import Config
from pipeline.prompt_rois import PromptSpec

if TYPE_CHECKING:  # model_routing loads torch (sam2_loader): not at the command line's start
    from pipeline.model_routing import RoutedModel

FailureKind = Literal["input", "transient", "held", "internal"]


@dataclass(frozen=True)
class ComputeTask:
    """One job's computation: the series and prompt RTSTRUCT to read, the prompts, where to write, the
    configuration, the seed of the output's UIDs, and per structure the model routed to it."""

    job_id: int
    series_folder: Path
    series_uid: str
    rtstruct_path: Path
    prompts: tuple[PromptSpec, ...]
    out_dir: Path
    config: Config
    uid_seed: str
    models: tuple[tuple[str, RoutedModel], ...]  # (structure, the model active for its ROI name and modality)

    def model_for(self, structure: str) -> RoutedModel:
        return dict(self.models)[structure]


@dataclass(frozen=True)
class StructureResult:
    """One propagated structure of a result: what was asked, what ran, what came out."""

    structure: str
    roi: str  # its ROI name in the written RTSTRUCT (TPS profile and suffix applied)
    prompt: str  # e.g. "box on slice 12"
    model: str
    backend: str
    checkpoint_sha256: str
    warnings: tuple[str, ...]  # the guard's reasons it looks implausible (models/guard.py)
    voxels: int
    slices: tuple[int, int]  # first and last slice it reaches
    seconds: float
    confidence: float  # the calibrated structure confidence in [0, 1] (models/confidence.py)

    def to_json(self) -> dict[str, Any]:
        """As the audit and the job's timeline record it."""
        return {"structure": self.structure, "roi": self.roi, "prompt": self.prompt, "warnings": list(self.warnings),
                "confidence": self.confidence, "model": self.model, "backend": self.backend, "checkpoint_sha256": self.checkpoint_sha256,
                "voxels": self.voxels, "slices": list(self.slices), "seconds": self.seconds}


@dataclass(frozen=True)
class CheckSummary:
    """The file check of a written RTSTRUCT (pipeline/file_check.py): read back, compared, references checked."""

    ok: bool
    dice: dict[str, float] = field(default_factory=dict)  # written ROI name -> Dice against its mask
    min_dice: float | None = None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class ComputeResult:
    """A computed job: the one RTSTRUCT written (and its file check), what made it, how long each step took."""

    path: Path
    sha256: str
    sop_instance_uid: str
    backend: str
    checkpoint_sha256: str
    model: str  # the models that ran, comma-separated
    timings_s: dict[str, float]
    structures: tuple[StructureResult, ...]
    file_check: CheckSummary
    pid: int = 0  # the process that computed it (0: the worker's own, pipeline.isolate_jobs off)
    job_in_process: int = 0  # 1: that process's first job; more: a warm process reused (pipeline/compute.py)

    @property
    def implausible(self) -> list[str]:
        """The guard's reasons, one line per structure and reason (what holds a job for review)."""
        return [f"{s.structure}: {w}" for s in self.structures for w in s.warnings]


@dataclass(frozen=True)
class ComputeFailure:
    """A computation that did not give a result, and whose fault it is (the worker acts on `kind`):
    input (the user's to fix), transient (retry later), held (file check: quarantined), internal (ours)."""

    error: str
    kind: FailureKind
    traceback: str = ""


ComputeOutcome = ComputeResult | ComputeFailure
