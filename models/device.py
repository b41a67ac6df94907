"""Which torch device runs the model, and the numeric settings that go with it.

CUDA if present (bf16 autocast only there: CPU bf16 is slower than fp32 on most CPUs and MPS
autocast is incomplete), else Apple MPS, else the CPU with a fixed thread count so that a
worker does not take every core of the node.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from config.errors import UserError


class DeviceError(UserError):
    """A device was asked for by name (`propagation.device`) and is not available on this node."""


def choose_device(requested: str = "auto", cpu_threads: int = 2) -> torch.device:
    """`auto` = cuda, then mps, then cpu; a named device that is absent is a DeviceError.

    On the CPU, torch's intra-op thread count is set to `cpu_threads` (settings.cpu_threads).
    """
    requested = (requested or "auto").lower()
    has_mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("propagation.device is 'cuda' but torch sees no CUDA device on this node")
    if requested == "mps" and not has_mps:
        raise DeviceError("propagation.device is 'mps' but torch sees no MPS device on this node")
    if requested not in ("cuda", "mps", "cpu"):
        raise DeviceError(f"propagation.device {requested!r} is not one of auto, cuda, mps, cpu")
    if requested == "cpu" and torch.get_num_threads() != cpu_threads:
        torch.set_num_threads(int(cpu_threads))
    return torch.device(requested)


@contextlib.contextmanager
def inference_context(device: torch.device) -> Iterator[None]:
    """torch.inference_mode, plus bf16 autocast on CUDA only (as Meta's and MedSAM2's demos do)."""
    with torch.inference_mode():
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
