"""The configuration schema: one YAML file, validated at start-up; unknown keys are errors."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    """Where the node keeps everything. Relative paths are resolved against `root`."""

    root: Path = Path("storage")
    archive: Path = Path("archive")
    quarantine: Path = Path("quarantine")
    outbox: Path = Path("outbox")
    database: Path = Path("rtprop.sqlite")
    min_free_mb: int = Field(500, ge=0, description="refuse C-STORE (0xA700) below this free space")
    fsync: bool = Field(True, description="fsync each received file and its folder before answering 0x0000 "
                        "(off: faster, but a power cut may lose instances already acknowledged)")
    pseudonym_key_file: Path | None = Field(
        None, description="the site's secret key (32 random bytes, created mode 0600 on first start) for the keyed "
        "hash (HMAC-SHA256) that stands for a Patient ID in the audit and the tables; kept outside the database "
        "and backed up apart from it; null = beside the SQLite file (<database>.key), or under the storage root "
        "(rtprop-postgresql.key) with database.url")


class DatabaseConfig(Section):
    """Where the rows live: unset, the SQLite file `storage.database` (one machine); a PostgreSQL URL for
    several receivers and workers on several machines (docs/scaling.md)."""

    url: str | None = Field(None, description="SQLAlchemy URL of a PostgreSQL database, "
                            "postgresql+psycopg://USER[:PASSWORD]@HOST:PORT/DB (psycopg 3); null = the SQLite file")

    @model_validator(mode="after")
    def _postgres_only(self) -> "DatabaseConfig":
        if self.url is not None and not self.url.startswith(("postgresql+psycopg://", "postgresql://")):
            raise ValueError(f"database.url {self.url.split('@')[-1]!r} must be a PostgreSQL URL "
                             "(postgresql+psycopg://USER@HOST:PORT/DB); leave it unset for the SQLite file")
        return self


class Destination(Section):
    ae_title: str = Field(..., min_length=1, max_length=16)
    host: str
    port: int = Field(..., ge=1, le=65535)


class RouteRule(Section):
    """Results of jobs whose images came from `calling_ae` go to `destination` (a key of destinations)."""

    calling_ae: str
    destination: str
    dry_run: bool = False


class TLSConfig(Section):
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False
    use_for_sends: bool = Field(False, description="also use TLS (same CA, and our certificate if set) "
                                "for outbound C-STORE to destinations")


class NodeConfig(Section):
    ae_title: str = Field("RTPROP", min_length=1, max_length=16)
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aes: list[str] = Field(default_factory=list, description="empty = accept any")
    max_associations: int = Field(10, ge=1, description="associations open at once (A-ASSOCIATE-RQ complete); "
                                  "connections still sending their request do not count")
    association_request_timeout_s: float = Field(
        10.0, gt=0, description="ARTIM (PS3.8 9.1.5): a new connection must deliver its whole A-ASSOCIATE-RQ (TLS "
        "handshake included) within this many seconds of being accepted, however its bytes are paced, else it is "
        "closed")
    max_pending_per_address: int = Field(4, ge=1, description="connections from one peer address whose "
                                         "A-ASSOCIATE-RQ is not yet complete; more are closed at once")
    max_association_request_bytes: int = Field(262144, ge=1024, description="an A-ASSOCIATE-RQ whose header "
                                               "declares more is refused before its body is read")
    max_pdu_bytes: int = Field(4194304, ge=4096, lt=2**32, description="Maximum Length Received we negotiate "
                               "(P-DATA-TF); a PDU whose header declares more aborts the association before its "
                               "body is read")
    reuse_port: bool = Field(False, description="listen with SO_REUSEPORT so that several `rtprop serve` processes "
                             "on this machine share node.port (needs database.url: they share one database)")
    series_quiet_period_s: float = Field(10.0, ge=0)
    complete_on_release: bool = False
    series_gap_timeout_s: float = Field(300.0, ge=0)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    routes: list[RouteRule] = Field(default_factory=list)
    default_destination: str | None = None
    send_max_attempts: int = Field(8, ge=1)
    send_backoff_s: float = Field(5.0, ge=0)
    send_backoff_max_s: float = Field(600.0, ge=0)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    send_timeout_s: float = Field(30.0, gt=0, description="ACSE/DIMSE/network timeout of one outbound association")
    poll_interval_s: float = Field(1.0, gt=0, description="how often the completion checker and the sender "
                                   "look for work in the database")

    @model_validator(mode="after")
    def _routes_name_destinations(self) -> "NodeConfig":
        """A route or default to a destination that is not configured is refused at start-up."""
        for i, rule in enumerate(self.routes):
            if rule.destination not in self.destinations and not rule.dry_run:
                raise ValueError(f"node.routes[{i}] (calling_ae {rule.calling_ae!r}) names destination "
                                 f"{rule.destination!r}, which is not in node.destinations {sorted(self.destinations)}")
        if self.default_destination and self.default_destination not in self.destinations:
            raise ValueError(f"node.default_destination {self.default_destination!r} is not in node.destinations "
                             f"{sorted(self.destinations)}")
        return self


class Sam2Config(Section):
    """The SAM2 backend (models/sam2_backend.py)."""

    model_cfg: str = Field("configs/sam2.1/sam2.1_hiera_t.yaml", description="sam2 model config (a config name "
                           "inside the sam2 package or a yaml file) that fits the checkpoint")
    image_size: int = Field(512, ge=64, description="model input size in pixels (a multiple of 64)")
    mode: Literal["video", "image_chain"] = "video"
    chain_box_margin_mm: float = Field(
        3.0, ge=0, description="image_chain mode: each slice is prompted with the previous slice's mask box "
        "grown by this margin")
    # What rtprop adds around sam2 (docs/propagators.md). All off, with condition_on: prompt, gives
    # sam2's own propagate_in_video output (MedSAM2's scheme with reset_between_directions on, Meta's demo off).
    condition_on: Literal["mask", "prompt"] = Field(
        "mask", description="video mode: 'mask' = each prompted slice is segmented first and the video predictor is "
        "conditioned on that mask (add_new_mask), so propagation starts from exactly the prompted-slice result; "
        "'prompt' = the box/clicks go to the video predictor as they are (add_new_points_or_box), as sam2's and "
        "MedSAM2's examples do")
    clip_box_output: bool = Field(True, description="a box prompt's SAM2 output is cut to the box (+2 px, and to "
                                  "any positive click on that slice outside it): a planner's box bounds the structure")
    reset_between_directions: bool = Field(
        True, description="video mode: the reverse pass starts from a fresh state with the prompts re-added "
        "(MedSAM2's scheme); false = it continues from the forward pass's state (Meta's demo)")
    stop_rules: bool = Field(True, description="stop beyond the outermost prompted slices at an empty slice, at "
                             "propagation.min_area_fraction of that slice's area, or at propagation.max_extent_mm; "
                             "false = every slice to the volume's edges, as sam2's propagate_in_video")
    largest_component: bool = Field(True, description="keep only the 3D components that pass through a prompted "
                                    "slice (26-connected)")
    fill_holes: bool = Field(True, description="fill enclosed holes slice by slice (sam2's own hole filling needs "
                             "its CUDA extension)")


class ClassicConfig(Section):
    """The weight-free `classic` backend (models/classic.py); defaults are general rules, not tuned per case."""

    method: Literal["register_refine", "intensity"] = Field(
        "register_refine", description="'register_refine' warps the previous slice's mask by slice-to-slice demons "
        "registration, then refines it with the key slice's intensity model (more accurate); 'intensity' refines "
        "the previous mask directly (about 5x faster, no registration)")
    registration_iterations: int = Field(30, ge=1, description="demons iterations per slice pair "
                                         "(register_refine only)")
    min_likelihood_ratio: float = Field(
        0.0, description="stop when the mean log-likelihood ratio (structure vs surroundings, key-slice model) of a "
        "new slice falls below this: 0 = the slice looks no more like the structure than like its surroundings")
    key_slice: Literal["tight_select", "histogram"] = Field(
        "tight_select", description="box prompts: how the key slice is segmented. 'histogram' = iterated intensity "
        "model inside the box vs the ring around it; 'tight_select' = that and two GrabCut segmentations that "
        "enforce the tight-box prior (the structure reaches every row and column of the box), keeping the "
        "candidate that covers the box's rows/columns best, then stands out most from its surroundings")
    model_update: float = Field(0.3, ge=0, le=1, description="weight of each new slice in the running intensity "
                                "model (0 = key slice only)")


class CineConfig(Section):
    """Cine-MR tracking through time (models/tracking.py)."""

    classic_method: Literal["ecc", "flow"] = Field(
        "ecc", description="classic backend: 'ecc' fits an affine motion of the region around the first-frame mask "
        "to each frame (OpenCV ECC, reference = first frame, no drift); 'flow' warps the mask by dense optical "
        "flow (Farneback) from the first frame")
    roi_margin_mm: float = Field(30.0, gt=0, description="how far (mm) the tumour may move between consecutive "
                                 "frames; the classic backend searches this far around its last position")


# Flat keys of releases before the nested sections: still read (with a warning) for one release.
DEPRECATED_PROPAGATION_KEYS = {
    "model_config_name": ("sam2", "model_cfg"),
    "image_size": ("sam2", "image_size"),
    "mode": ("sam2", "mode"),
    "chain_box_margin_mm": ("sam2", "chain_box_margin_mm"),
    "classic_method": ("classic", "method"),
    "classic_registration_iterations": ("classic", "registration_iterations"),
    "classic_min_likelihood_ratio": ("classic", "min_likelihood_ratio"),
    "classic_key_slice": ("classic", "key_slice"),
    "classic_model_update": ("classic", "model_update"),
    "cine_classic_method": ("cine", "classic_method"),
    "cine_roi_margin_mm": ("cine", "roi_margin_mm"),
}


class ConfigDeprecationWarning(UserWarning):
    """A configuration key that still works but has a new name (the message names both)."""


class PropagationConfig(Section):
    backend: str = Field("auto", min_length=1, description="a propagator registered in models/backends.py "
                         "(sam2, classic) or auto: sam2 when a checkpoint is set, else classic; checked when the "
                         "configuration is loaded")
    checkpoint: Path | None = None
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    cpu_threads: int = Field(2, ge=1)
    ct_window_level: float = 40.0
    ct_window_width: float = Field(400.0, gt=0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    min_area_fraction: float = Field(0.1, ge=0, le=1, description="stop when a slice shrinks below this fraction of the key slice")
    max_extent_mm: float = Field(300.0, gt=0)
    sam2: Sam2Config = Field(default_factory=Sam2Config)
    classic: ClassicConfig = Field(default_factory=ClassicConfig)
    cine: CineConfig = Field(default_factory=CineConfig)

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_keys(cls, data: Any) -> Any:
        """Old flat keys (`classic_method`, `image_size`, ...) move into their section, with a warning."""
        if not isinstance(data, dict) or not DEPRECATED_PROPAGATION_KEYS.keys() & data.keys():
            return data
        data = dict(data)
        for old, (section, key) in DEPRECATED_PROPAGATION_KEYS.items():
            if old not in data:
                continue
            value = data.pop(old)
            sub = dict(data.get(section) or {})
            if key in sub:
                raise ValueError(f"propagation.{old} and propagation.{section}.{key} both given: keep "
                                 f"propagation.{section}.{key}")
            sub[key] = value
            data[section] = sub
            warnings.warn(f"configuration key propagation.{old} is deprecated: use propagation.{section}.{key}",
                          ConfigDeprecationWarning, stacklevel=2)
        return data


class RTStructConfig(Section):
    tps_profile: Literal["generic", "eclipse", "raystation", "monaco"] = "generic"
    roi_suffix: str = "_prop"
    roi_color: tuple[int, int, int] = (255, 128, 0)
    roi_interpreted_type: str = "ORGAN"
    structure_set_label: str = "RTPROP"


class PipelineConfig(Section):
    workers: int = Field(1, ge=1)
    job_timeout_s: float = Field(1800.0, gt=0)
    file_check_min_dice: float = Field(
        0.98, ge=0, le=1, description="the written RTSTRUCT is read back and each ROI compared with the mask it was "
        "written from; below this Dice the file is not what was computed and the job is quarantined (a check of the "
        "file, not of the contour's quality)")
    prompt_mode: Literal["box", "mask", "auto"] = Field(
        "box", description="a single-slice ROI becomes a box prompt (its bounding rectangle; a rectangle drawn "
        "in the TPS is exact), a mask prompt (the drawn outline), or auto: box if the outline is a rectangle "
        "(fills >= 95 % of its bounding rectangle), else mask")
    positive_point_marker: str = "+"
    negative_point_marker: str = "-"
    multi_slice_max: int = Field(5, ge=1, description="an ROI drawn on 2..this many slices, none of them "
                                 "neighbours, is one prompt on several slices (more, or neighbouring slices: a contour)")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        """`self_check_min_dice` (it checks the file, not the contour) is read as `file_check_min_dice`, with a
        warning, for one release."""
        if not isinstance(data, dict) or "self_check_min_dice" not in data:
            return data
        data = dict(data)
        if "file_check_min_dice" in data:
            raise ValueError("pipeline.self_check_min_dice and pipeline.file_check_min_dice both given: keep "
                             "pipeline.file_check_min_dice")
        data["file_check_min_dice"] = data.pop("self_check_min_dice")
        warnings.warn("configuration key pipeline.self_check_min_dice is deprecated: use "
                      "pipeline.file_check_min_dice", ConfigDeprecationWarning, stacklevel=2)
        return data
    recontour_roi_regex: str | None = Field(
        None, description="re-contour mode: a fully contoured ROI whose name matches this regex (case-insensitive, "
        "full match, e.g. '(GTV|CTV).*') is re-propagated from its middle slice; null = off")
    dry_run_aes: list[str] = Field(default_factory=list, description="calling AEs whose jobs are processed and "
                                   "audited but never sent (shadow mode)")
    poll_interval_s: float = Field(1.0, gt=0, description="how often workers look for new prompt RTSTRUCTs and "
                                   "queued jobs in the database")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="a running job's worker refreshes its claim this often")
    heartbeat_timeout_s: float = Field(60.0, gt=0, description="a running job whose heartbeat is older than this "
                                       "(its worker died) goes back to queued")
    job_max_attempts: int = Field(3, ge=1, description="a job whose worker died or timed out this many times is "
                                  "dead-lettered")
    series_wait_s: float = Field(3600.0, ge=0, description="a prompt RTSTRUCT whose image series has not arrived "
                                 "(complete) this long after it fails")
    job_retry_backoff_s: float = Field(30.0, ge=0, description="a job hit by a transient fault (full disk, busy "
                                       "database, archive share away) is retried after this, doubling each time")
    job_retry_backoff_max_s: float = Field(900.0, ge=0, description="the longest wait between such retries")
    isolate_jobs: bool = Field(True, description="run each job's computation in a child process, killed after "
                               "job_timeout_s (off: in the worker's own process, no hard timeout)")


class DropInConfig(Section):
    enabled: bool = False
    inbox: Path = Path("inbox")
    done: Path = Path("done")
    stable_s: float = Field(5.0, ge=0)
    outbox: Path = Field(Path("dropin-outbox"), description="finished RTSTRUCTs of dropped cases, named "
                         "<case>__RS_<SOPInstanceUID>.dcm; a failed case gets <case>.failed.json here")
    quarantine: Path = Field(Path("dropin-quarantine"), description="dropped cases that could not be taken in, "
                             "moved here whole with a <case>.reason.json; nothing is ever deleted")
    calling_ae: str = Field("DROPIN", min_length=1, max_length=16, description="the AE title dropped instances "
                            "are recorded under (routes and dry_run_aes match it)")
    poll_interval_s: float = Field(1.0, gt=0, description="fallback scan of the inbox besides file-system events")


class BatchConfig(Section):
    enabled: bool = False
    window_start: str = "01:00"
    window_end: str = "05:00"
    roi_regex: str = ".*"
    send_results: bool = False
    out: Path = Field(Path("batch"), description="batch runs write here: <date>/drift.csv, montage PNGs, RTSTRUCTs")
    prompt_kind: Literal["box", "point", "mask"] = Field("box", description="prompt taken from each ROI's middle slice")
    lookback_days: float = Field(1.0, gt=0, description="scheduled runs cover series received this many days back")
    montage_cases: int = Field(6, ge=1, description="the worst ROIs (lowest Dice) drawn in the PNG montage")
    patient_label: Literal["hash", "patient_id"] = Field(
        "hash", description="how drift.csv, the montage and the web app's batch page name a case's patient: 'hash' = "
        "the first 12 characters of the hashed Patient ID (what the audit keeps); 'patient_id' = the Patient ID as "
        "the TPS shows it, where the site allows it in reports")


class WebConfig(Section):
    """The review and operations web app (web/), served by `rtprop serve --http-port` or `rtprop web`."""

    host: str = Field("127.0.0.1", description="listen address; 0.0.0.0 only behind a firewall or with TLS")
    port: int | None = Field(None, ge=0, le=65535, description="HTTP(S) port; null = no web app in `rtprop serve` "
                             "unless --http-port is given")
    tls_certificate: Path | None = Field(None, description="PEM certificate: serve HTTPS (else HTTP, e.g. behind "
                                         "an HTTPS reverse proxy, see docs/web.md)")
    tls_private_key: Path | None = None
    secure_cookies: bool = Field(False, description="mark the session cookie Secure (on by itself with "
                                 "tls_certificate; set it behind an HTTPS reverse proxy)")
    forwarded_allow_ips: str = Field("127.0.0.1", description="reverse proxies trusted for X-Forwarded-For/-Proto")
    session_secret_file: Path = Field(Path("web-session.key"), description="key signing session cookies; created "
                                      "(mode 0600) under the storage root on first start")
    session_max_age_s: int = Field(12 * 3600, gt=0, description="a login lasts at most this long")
    session_idle_timeout_s: int = Field(1800, gt=0, description="a session unused this long ends (the dashboard's "
                                        "own 5 s refreshes do not count as use)")
    metrics_require_login: bool = Field(False, description="put GET /metrics behind login (a Bearer API token "
                                        "works for Prometheus)")
    login_max_failures: int = Field(5, ge=1, description="failed logins for one user name from one client address "
                                    "(4 times as many for one address, any names) before further tries from there "
                                    "are refused for login_lockout_s")
    login_lockout_s: float = Field(60.0, gt=0)
    health_worker_max_age_s: float = Field(30.0, gt=0, description="/health: a worker heartbeat must be younger")
    health_node_max_age_s: float = Field(30.0, gt=0, description="/health: a node (SCP) heartbeat must be younger")
    health_refusals_window_s: float = Field(300.0, gt=0, description="/health is degraded while the node refused "
                                            "a connection or association within this many seconds")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="node and worker processes write a heartbeat row "
                                        "this often (table heartbeats)")
    health_echo_timeout_s: float = Field(3.0, gt=0, description="not used any more (/health reads heartbeats, it "
                                         "opens no association); still accepted so older files load")
    volume_cache_series: int = Field(2, ge=1, description="decoded series kept in memory for the review pages")
    audit_verify_interval_s: float = Field(300.0, gt=0, description="/metrics: the audit chain is re-verified at "
                                           "most this often (it walks every row)")


class ReviewConfig(Section):
    """Review before send: a validated job waits in `awaiting_review` until a reviewer accepts or rejects it."""

    before_send: bool = Field(False, description="hold every validated job for review")
    per_calling_ae: dict[str, bool] = Field(default_factory=dict, description="override before_send for jobs "
                                            "whose images came from these calling AEs")
    remind_after_min: float | None = Field(60.0, gt=0, description="the dashboard lists jobs awaiting review "
                                           "longer than this; null = no reminder")
    uncertain_below: float = Field(0.5, ge=0, le=1, description="review page: slices whose propagation "
                                   "confidence is below this are marked uncertain")

    def required_for(self, calling_ae: str) -> bool:
        """Must a job from `calling_ae` be reviewed before it is sent?"""
        return self.per_calling_ae.get((calling_ae or "").strip(), self.before_send)


class GuardConfig(Section):
    """What happens to a result that looks implausible (models/guard.py names the reasons)."""

    hold_implausible: bool = Field(True, description="hold such a job for a person (awaiting_review) instead of "
                                   "sending it; the reasons are on the job, in the audit and in the RTSTRUCT")
class ModelsConfig(Section):
    """The model registry and its promotion gate (model_lifecycle/registry.py, docs/finetune.md)."""

    folder: Path = Field(Path("models"), description="registered checkpoints are copied here (relative to "
                         "storage.root), as <sha256>.pt with their model card beside them")
    gate_mean_dice_margin: float = Field(
        0.01, ge=0, le=1, description="activate refuses a model whose mean Dice on the validation ROIs is lower "
        "than the active model's by more than this")
    gate_roi_dice_margin: float = Field(
        0.05, ge=0, le=1, description="... or whose mean Dice on any one ROI name is lower by more than this "
        "(the refusal names those ROIs)")


class Config(Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    node: NodeConfig = Field(default_factory=NodeConfig)
    propagation: PropagationConfig = Field(default_factory=PropagationConfig)
    rtstruct: RTStructConfig = Field(default_factory=RTStructConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    dropin: DropInConfig = Field(default_factory=DropInConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
