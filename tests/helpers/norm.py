"""Shared assertion for the normalization tests."""

from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """Explicit tolerances; the failure names the largest absolute and relative difference."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    bad = diff > bound
    if bad.any():
        rel = (diff / expected.double().abs().clamp_min(1e-30)).max().item()
        raise AssertionError(f"{what}: max abs diff {diff.max().item():.3e}, max rel diff {rel:.3e} (atol={atol}, rtol={rtol}), {int(bad.sum())} elements out of tolerance")
