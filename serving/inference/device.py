"""The device models run on: picking it (DEVICE, else CUDA when available), inference mode and fp16, OOM."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from serving.settings import Settings


def pick_device(settings: Settings) -> str:
    """Return the device to run on: DEVICE setting, else cuda when available, else cpu."""
    if settings.device:
        return settings.device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


@contextlib.contextmanager
def torch_context(device: str, fp16: bool) -> Iterator[None]:
    """Run under inference_mode, and fp16 autocast on CUDA when allowed."""
    try:
        import torch
    except Exception:
        yield
        return
    with torch.inference_mode():
        if fp16 and device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.float16):
                yield
        else:
            yield


def is_oom(exc: BaseException) -> bool:
    """Return True for CUDA (or CPU allocator) out-of-memory errors."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except Exception:  # torch missing: only the message can tell
        pass
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def free_cuda_cache() -> None:
    """Return cached CUDA blocks to the driver after an OOM (nothing without CUDA)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
