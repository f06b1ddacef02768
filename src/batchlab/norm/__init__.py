"""Normalization layers, their functional core, a NumPy reference and tools."""

from batchlab.norm.registry import create_norm, known_norms

__all__ = ["create_norm", "known_norms"]
