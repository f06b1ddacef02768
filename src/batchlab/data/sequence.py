"""Variable-length sequences, padded to one length, for normalization experiments on sequences.

A batch of padded sequences is where BatchNorm and LayerNorm differ most: BatchNorm's statistics
mix real tokens with padding and with other sequences, LayerNorm normalizes each token alone.

Layout: ``x`` is (N, L, D + 1). The first D channels are token features (zero at padding); the
last channel is the mask, 1.0 at real tokens and 0.0 at padding. Keeping the mask inside ``x``
means every generic training loop, ``subset`` and ``to(device)`` carry it along with no special
case; :class:`batchlab.models.SequenceNet` splits it off again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchlab.data.arrays import ArrayDataset
from batchlab.data.synthetic import split_train_val


@dataclass
class SequenceDataset(ArrayDataset):
    """Padded sequences: ``x`` (N, L, D + 1) with the mask as last channel, ``y`` (N,)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.x.dim() != 3 or self.x.shape[-1] < 2:
            raise ValueError(f"x must be (N, L, D + 1) with the mask as last channel, got shape {tuple(self.x.shape)}")

    @property
    def features(self) -> torch.Tensor:
        """Token features (N, L, D), zero at padding."""
        return self.x[..., :-1]

    @property
    def mask(self) -> torch.Tensor:
        """Boolean (N, L): True at real tokens."""
        return self.x[..., -1] > 0.5

    @property
    def lengths(self) -> torch.Tensor:
        """int64 (N,): number of real tokens per sequence."""
        return self.mask.sum(dim=1)

    def subset(self, n: int | None = None, *, seed: int = 0) -> SequenceDataset:
        s = super().subset(n, seed=seed)
        return s if isinstance(s, SequenceDataset) else SequenceDataset(s.x, s.y)

    def to(self, device: torch.device | str) -> SequenceDataset:
        return SequenceDataset(self.x.to(device), self.y.to(device))


def make_sequences(
    n_samples: int = 4000,
    *,
    min_len: int = 4,
    max_len: int = 32,
    dim: int = 8,
    num_classes: int = 4,
    vocab_size: int = 12,
    signal_fraction: float = 0.25,
    noise: float = 0.3,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[SequenceDataset, SequenceDataset]:
    """A padded sequence classification set ``(train, val)``.

    Each sequence has a length drawn uniformly from ``min_len..max_len`` and tokens drawn
    uniformly from ``vocab_size`` types; the first ``num_classes`` types are "signal" types. One
    signal type is planted at ``signal_fraction`` of the positions. The label is read back from
    the content: the signal type occurring most often among the real tokens (ties go to the
    smaller type), so it depends on token frequencies, which a masked mean over tokens exposes.
    A token's features are its type's random prototype vector (D) plus Gaussian noise.

    Returns:
        ``(train, val)`` :class:`SequenceDataset`: x float32 (N, max_len, dim + 1), y int64.
    """
    for name, value, low in (("n_samples", n_samples, 2), ("min_len", min_len, 1), ("dim", dim, 1),
                             ("num_classes", num_classes, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_len < min_len:
        raise ValueError(f"max_len must be >= min_len ({min_len}), got {max_len}")
    if vocab_size < num_classes:
        raise ValueError(f"vocab_size must be >= num_classes ({num_classes}), got {vocab_size}")
    if not 0.0 <= signal_fraction <= 1.0:
        raise ValueError(f"signal_fraction must be in [0, 1], got {signal_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    n, L = n_samples, max_len
    prototypes = torch.randn(vocab_size, dim, generator=g)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    mask = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)
    tokens = torch.randint(vocab_size, (n, L), generator=g)
    planted = torch.randint(num_classes, (n,), generator=g)
    # plant the signal type at a random ceil(fraction * length) of each sequence's real positions
    scores = torch.rand(n, L, generator=g).masked_fill(~mask, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    k = torch.ceil(lengths.float() * signal_fraction).long()
    tokens = torch.where(ranks < k.unsqueeze(1), planted.unsqueeze(1), tokens)
    counts = torch.stack([((tokens == c) & mask).sum(dim=1) for c in range(num_classes)], dim=1)
    y = counts.argmax(dim=1)  # first maximum on ties
    feats = prototypes[tokens] + noise * torch.randn(n, L, dim, generator=g)
    feats = feats * mask.unsqueeze(-1)
    x = torch.cat([feats, mask.unsqueeze(-1).float()], dim=-1).float().contiguous()
    tr, va = split_train_val(x, y.long(), val_fraction)
    return SequenceDataset(tr.x, tr.y), SequenceDataset(va.x, va.y)
