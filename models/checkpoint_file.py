"""A checkpoint file's identity and its error, without torch: job routing checks a registered model's file
(pipeline/model_routing.py) in processes that never load a model (the weight-free backend's jobs)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from config.errors import UserError


class CheckpointError(UserError):
    """A checkpoint or model config that cannot be used; the message names the file and its folder."""


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The sha256 of a file, read in blocks (a checkpoint is hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
