"""Where and how a model runs: the device a `--device` names, host tensors moved to it without waiting, and the
compute precision (autocast) of a forward pass."""

from __future__ import annotations

import torch

from attnatlas.errors import ModelError


def resolve_device(device: str) -> torch.device:
    """The torch device of `--device` (auto: CUDA, else MPS, else the CPU); ModelError for one not here."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA device is available (use --device auto or cpu).")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("--device mps was asked for, but MPS is not available (use --device auto or cpu).")
    if device not in ("cpu", "cuda", "mps"):
        raise ModelError(f"Unknown device {device!r}: use auto, cpu, cuda or mps.")
    return torch.device(device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: from pinned memory, copied asynchronously."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The compute precision of a forward pass: float32 turns autocast off, bfloat16/float16 turn it on."""
    if precision == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, precision))
