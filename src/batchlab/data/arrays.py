"""In-memory tensor data sets, batched by index.

Every built-in data set is a pair of tensors held in memory. A batch is one ``index_select``
on a permutation drawn from a seeded generator, so there is no per-sample Python work and
every epoch reshuffles.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class ArrayDataset:
    """Inputs ``x`` (N, ...) and integer targets ``y`` (N,) held in memory."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"x and y must have the same number of samples, got {self.x.shape[0]} and {self.y.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, n: int | None = None, *, seed: int = 0) -> ArrayDataset:
        """A random subset of ``n`` samples (all when ``n`` is None), drawn with ``seed``."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n]
        return ArrayDataset(self.x[idx], self.y[idx])

    def to(self, device: torch.device | str) -> ArrayDataset:
        return ArrayDataset(self.x.to(device), self.y.to(device))

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches for one epoch; a new permutation on every call when shuffling."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=generator).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        stop = n - (n % batch_size) if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)
