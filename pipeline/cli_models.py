"""`rtprop finetune` and `rtprop models ...`: fine-tuning on the archive, the model registry, the promotion gate.

Registered on the main group by pipeline/cli.py (`cli.add_command`); thin shells over
pipeline/finetune.py and pipeline/registry.py. Same conventions as the other subcommands: one JSON
summary on stdout, progress and tables on stderr, user-fixable errors exit 2 (pipeline.cli.main).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from config.load import load_config, resolve_storage
from config.schema import Config
from pipeline.cli_params import ISO_DATE, config_option, storage_option



def _config(config_path: Path | None, storage: Path | None) -> Config:
    overrides = {"storage": {"root": str(storage)}} if storage is not None else None
    return resolve_storage(load_config(config_path, overrides=overrides))


def _emit(summary: dict[str, Any]) -> None:
    click.echo(json.dumps(summary, sort_keys=True, default=str))


def _factory(config: Config):  # type: ignore[no-untyped-def]
    from db.engine import open_database

    if not config.storage.database.exists():
        raise click.ClickException(f"no database at {config.storage.database} (give --storage of a node)")
    return open_database(config.storage.database, key_path=config.storage.pseudonym_key_file)


# ---------------------------------------------------------------- finetune
@click.command()
@config_option
@storage_option
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Train on these NPZ files (MedSAM2 layout) instead of the archive.")
@click.option("--roi-regex", help="Archived ROIs to learn: case-insensitive full match, e.g. 'GTV.*' (with --storage).")
@click.option("--since", type=ISO_DATE, help="Only RTSTRUCTs received from this ISO 8601 date or date-time (UTC unless an offset is given).")
@click.option("--include-own", is_flag=True, help="Also learn from RTSTRUCTs rtprop wrote (default: clinic contours only).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to write; OUT.card.json/.card.md beside it. Started again with the same OUT, a run "
                   "continues from its last saved step (OUT.state.pt).")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True, help="Optimizer steps.")
@click.option("--image-size", type=int, help="Model input size (default: propagation.sam2.image_size).")
@click.option("--model-cfg", help="sam2 architecture (default: propagation.sam2.model_cfg).")
@click.option("--base", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Checkpoint to start from (e.g. MedSAM2 or SAM2.1 tiny weights on this node).")
@click.option("--random-init", is_flag=True, help="Start from seeded random weights (tests and benchmarks only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split, the samples and the dropout.")
@click.option("--freeze-image-encoder", is_flag=True, help="Train decoder, memory and prompt parts only (CPU-feasible).")
@click.option("--freeze-prompt-encoder", is_flag=True, help="Keep the prompt encoder as it is.")
@click.option("--mode", type=click.Choice(["video", "image", "both"]), default="video", show_default=True,
              help="video: clips through the memory path; image: jittered box prompts; both: half each.")
@click.option("--clip-frames", type=click.IntRange(min=1), default=8, show_default=True,
              help="Video mode: consecutive slices per clip.")
@click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per optimizer step (gradient accumulation).")
@click.option("--lr", type=float, default=1e-5, show_default=True, help="Peak learning rate (AdamW, cosine decay).")
@click.option("--validation-fraction", type=click.FloatRange(0, 0.9), default=0.2, show_default=True,
              help="Share of PATIENTS held out for validation.")
@click.option("--save-every", type=click.IntRange(min=1), default=25, show_default=True,
              help="Save the resumable state every N steps.")
@click.option("--device", type=click.Choice(["auto", "cuda", "mps", "cpu"]), help="Default: propagation.device.")
@click.option("--no-progress", is_flag=True, help="No progress bar (cron, logs).")
def finetune(config_path: Path | None, storage: Path | None, data_dir: Path | None, roi_regex: str | None,
             since: str | None, include_own: bool, out: Path, steps: int, image_size: int | None,
             model_cfg: str | None, base: Path | None, random_init: bool, seed: int, freeze_image_encoder: bool,
             freeze_prompt_encoder: bool, mode: str, clip_frames: int, accumulate: int, lr: float,
             validation_fraction: float, save_every: int, device: str | None, no_progress: bool) -> None:
    """Fine-tune SAM2 on the clinic's approved contours (split by patient); write the checkpoint and its model card."""
    from models.finetune import FinetuneSettings
    from pipeline.finetune import run_finetune

    if data_dir is None and storage is None and config_path is None:
        raise click.UsageError("give --storage DIR (with --roi-regex) or --data DIR")
    config = _config(config_path, storage)
    p = config.propagation
    settings = FinetuneSettings(steps=steps, image_size=image_size or p.sam2.image_size,
                                model_cfg=model_cfg or p.sam2.model_cfg, base=base, random_init=random_init,
                                seed=seed, lr=lr, accumulate=accumulate, mode=mode, clip_frames=clip_frames,
                                freeze_image_encoder=freeze_image_encoder,
                                freeze_prompt_encoder=freeze_prompt_encoder, save_every=save_every,
                                device=device or p.device, cpu_threads=p.cpu_threads)
    _emit(run_finetune(config, out, settings, data=data_dir, roi_regex=roi_regex, since=since,
                       include_own=include_own, validation_fraction=validation_fraction, progress=not no_progress))


# ---------------------------------------------------------------- models
@click.group()
def models() -> None:
    """The model registry: register, evaluate on held-out patients, activate through the gate, retire."""


@models.command("add")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--card", "card", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Model card (default: CHECKPOINT.card.json if present).")
@click.option("--name", help="Registry name (default: <card name or file stem>-<sha256 prefix>).")
@click.option("--model-cfg", help="Architecture, when there is no card (default: propagation.sam2.model_cfg).")
@click.option("--image-size", type=int, help="Input size, when there is no card (default: propagation.sam2.image_size).")
@config_option
@storage_option
def models_add(checkpoint: Path, card: Path | None, name: str | None, model_cfg: str | None,
               image_size: int | None, config_path: Path | None, storage: Path | None) -> None:
    """Register CHECKPOINT (copied under the storage with its sha256); prints the model's name on the last line."""
    from pipeline.registry import add_model

    config = _config(config_path, storage)
    row, created = add_model(_factory(config), config, checkpoint, card_path=card, name=name, model_cfg=model_cfg,
                             image_size=image_size)
    click.echo(f"{'registered' if created else 'already registered as'} {row.name}: sha256 {row.sha256}, "
               f"{row.model_cfg} at {row.image_size} px, file {row.path}", err=True)
    click.echo(row.name)


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@config_option
@storage_option
def models_list(as_json: bool, config_path: Path | None, storage: Path | None) -> None:
    """Registered models, where each is active, and their last validation Dice."""
    from pipeline.registry import list_models

    config = _config(config_path, storage)
    rows = list_models(_factory(config), config)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r, sort_keys=True, default=str))
        return
    header = f"{'name':<32} {'backend':<8} {'sha256':<12} {'state':<10} {'for ROI':<16} {'mod':<4} {'val Dice':>8} " \
             f"{'vs active':>9}  added by"
    click.echo(header)
    for r in rows:
        state = r["state"] + ("*" if r["default"] and r["state"] != "active" else "")
        dice = "" if r["validation_dice"] is None else f"{r['validation_dice']:.3f}"
        other = "" if r["active_dice"] is None else f"{r['active_dice']:.3f}"
        click.echo(f"{r['name']:<32} {r['backend']:<8} {r['sha256'][:12]:<12} {state:<10} {r['for_roi']:<16} "
                   f"{r['modality']:<4} {dice:>8} {other:>9}  {r['added_by']}")
    click.echo("* the default: contours every ROI no active model claims", err=True)


@models.command("evaluate")
@click.argument("name")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the re-contoured RTSTRUCTs go (default: <models folder>/evaluations/NAME/<time>).")
@click.option("--no-progress", is_flag=True)
@config_option
@storage_option
def models_evaluate(name: str, out_dir: Path | None, no_progress: bool, config_path: Path | None,
                    storage: Path | None) -> None:
    """Re-contour the validation patients' ROIs with NAME and with the active model; Dice/HD95 per ROI."""
    from pipeline.registry import evaluate_model

    config = _config(config_path, storage)
    ev = evaluate_model(_factory(config), config, name, out=out_dir, progress=not no_progress)
    click.echo(f"{'ROI':<24} {'n':>3} {name[:12]:>12} {'active':>8} {'HD95 new':>9} {'HD95 act':>9}", err=True)
    for roi, c in ev["candidate"]["per_roi"].items():
        a = ev["active"]["per_roi"].get(roi, {})
        click.echo(f"{roi:<24} {c['n']:>3} {c['dice']:>12.3f} {a.get('dice', float('nan')):>8.3f} "
                   f"{_mm(c['hd95_mm']):>9} {_mm(a.get('hd95_mm')):>9}", err=True)
    _emit({k: ev[k] for k in ("model", "sha256", "patients", "out", "candidate", "active")})


def _mm(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@models.command("activate")
@click.argument("name")
@click.option("--for-roi", "for_roi", default="", help="Only for ROIs whose name fully matches this regex "
              "(case-insensitive; default: every ROI).")
@click.option("--modality", type=click.Choice(["CT", "MR"], case_sensitive=False), default=None,
              help="Only for series of this modality (default: any).")
@click.option("--force", is_flag=True, help="Activate even if the gate refuses (needs --reason; audited).")
@click.option("--reason", default="", help="Why the gate is overridden (written to the audit log).")
@click.option("--no-progress", is_flag=True)
@config_option
@storage_option
def models_activate(name: str, for_roi: str, modality: str | None, force: bool, reason: str, no_progress: bool,
                    config_path: Path | None, storage: Path | None) -> None:
    """Let NAME contour (ROIs matching --for-roi, --modality) if it is not worse than the active model."""
    from pipeline.registry import activate_model

    config = _config(config_path, storage)
    _emit(activate_model(_factory(config), config, name, roi_regex=for_roi, modality=modality or "", force=force,
                         reason=reason, progress=not no_progress))


@models.command("retire")
@click.argument("name")
@click.option("--reason", default="", help="Written to the audit log.")
@config_option
@storage_option
def models_retire(name: str, reason: str, config_path: Path | None, storage: Path | None) -> None:
    """Never use NAME again (its file and card stay for the record)."""
    from pipeline.registry import retire_model

    config = _config(config_path, storage)
    _emit(retire_model(_factory(config), name, reason))
