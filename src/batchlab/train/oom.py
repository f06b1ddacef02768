"""Recognizing out-of-memory errors by type and message."""

from __future__ import annotations

import gc

import torch

OOM_MESSAGES = (
    "out of memory",
    "CUDNN_STATUS_NOT_SUPPORTED",
    "DefaultCPUAllocator: can't allocate memory",
    "can't allocate memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
)


def is_oom(exc: BaseException) -> bool:
    """True when ``exc`` is an out-of-memory error (CUDA, cuDNN, cuBLAS or the CPU allocator)."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc)
        return any(m in msg for m in OOM_MESSAGES)
    return False


def free_memory() -> None:
    """Collect garbage and release cached accelerator memory after an OOM."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
