"""Lightning integration: track the gradient noise scale B_simple while a ``Trainer`` trains.

``Trainer(accumulate_grad_batches=4, callbacks=[GradientNoiseScaleCallback()])`` logs ``b_simple``
(McCandlish et al. 2018, "An Empirical Model of Large-Batch Training") through the module's
logger once per optimizer step, from two batch sizes that the step already computes:

- small: each micro-batch's gradient. Lightning divides every micro-batch loss by
  ``accumulate_grad_batches`` (k) and accumulates into ``.grad``, so after the i-th backward
  (``on_after_backward``) the micro-batch gradient is ``k * (grad_after - grad_before)``;
- big: the accumulated ``.grad`` at ``on_before_optimizer_step`` (before clipping), which is the
  mean of the k micro-batch gradients, i.e. a gradient on ``k * micro_batch`` examples.

The per-step estimates of ``|G|^2`` and ``tr(Sigma)`` are smoothed by two separate EMAs and
B_simple is their ratio (:class:`batchlab.batchsize.GradientNoiseScale` does the arithmetic).
It costs one copy of the gradients and no extra forward or backward pass. Windows whose
micro-batches differ in size or count (the short tail of an epoch) are skipped.

Needs the optional extra: ``pip install 'batchlab[lightning]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "batchlab.integrations.lightning needs Lightning (>= 2.2): pip install 'batchlab[lightning]' "
        f"(import failed: {e})"
    ) from e

from batchlab.batchsize.noise import GradientNoiseScale

__all__ = ["GradientNoiseScaleCallback", "default_batch_size"]


def default_batch_size(batch: Any) -> int:
    """Examples in ``batch``: the leading dimension of its first tensor (tuples, lists, dicts)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            try:
                return default_batch_size(item)
            except TypeError:
                continue
    raise TypeError(
        f"cannot tell the size of a batch of type {type(batch).__name__}; pass batch_size_fn= to GradientNoiseScaleCallback"
    )


class GradientNoiseScaleCallback(pl.Callback):
    """Log the gradient noise scale B_simple during ``Trainer.fit`` (needs ``accumulate_grad_batches >= 2``).

    Args:
        beta: EMA factor of the two accumulators (0.99 in the paper; 0.9-0.95 for short runs).
        every: measure every ``every``-th optimizer step only (the others cost nothing).
        name: the logged metric's name.
        batch_size_fn: ``fn(batch) -> int`` examples in a micro-batch (default: leading dimension
            of the first tensor).
        prog_bar: also show the value in the progress bar.

    Attributes:
        tracker: the :class:`~batchlab.batchsize.GradientNoiseScale` holding the EMAs and history
            (``tracker.b_simple``, ``tracker.state()``).
    """

    def __init__(
        self,
        beta: float = 0.99,
        every: int = 1,
        name: str = "b_simple",
        batch_size_fn: Callable[[Any], int] | None = None,
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        self.tracker = GradientNoiseScale(beta=beta, every=every)  # validates beta and every
        self.every = every
        self.name = name
        self.batch_size_fn = batch_size_fn or default_batch_size
        self.prog_bar = prog_bar
        self._k = 1
        self._active = False
        self._prev: list[torch.Tensor] | None = None
        self._small: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._size = 0

    @property
    def b_simple(self) -> float:
        """The current EMA ratio (NaN before the first measurement)."""
        return self.tracker.b_simple

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        k = trainer.accumulate_grad_batches
        if not isinstance(k, int) or k < 2:
            raise ValueError(
                "GradientNoiseScaleCallback needs two batch sizes per step: set Trainer(accumulate_grad_batches=k) "
                f"with k >= 2 (micro-batch vs accumulated gradient); got accumulate_grad_batches={k!r}"
            )
        if trainer.world_size > 1:
            raise ValueError(
                "GradientNoiseScaleCallback measures on one device (with DDP the last micro-batch's gradient is "
                f"already all-reduced); got world_size={trainer.world_size}. Use batchlab.distributed.fit_ddp, "
                "which measures from per-rank gradients."
            )
        if not pl_module.automatic_optimization:
            raise ValueError("GradientNoiseScaleCallback needs automatic optimization (automatic_optimization=True)")
        self._k = k

    def _params(self, pl_module: pl.LightningModule) -> list[torch.nn.Parameter]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    @staticmethod
    def _sqnorm(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        if not ts:
            return torch.zeros((), dtype=torch.float64)
        return torch.stack([t.detach().double().square().sum() for t in ts]).sum()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % self._k == 0:  # first micro-batch of an accumulation window
            self._active = trainer.global_step % self.every == 0
            self._prev, self._small, self._sizes = None, [], []
        self._size = self.batch_size_fn(batch)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        params = self._params(pl_module)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        diff = grads if self._prev is None else torch._foreach_sub(grads, self._prev)
        self._small.append(self._sqnorm(diff) * (self._k * self._k))  # undo Lightning's loss / k
        self._sizes.append(self._size)
        if self._prev is None:
            self._prev = [g.detach().clone() for g in grads]
        else:
            torch._foreach_copy_(self._prev, grads)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._active:
            return
        self._active = False
        sizes, small = self._sizes, self._small
        self._prev, self._small, self._sizes = None, [], []
        if len(sizes) != self._k or len(set(sizes)) != 1:
            return  # a short window at the end of an epoch: its mean is not a k * b batch gradient
        params = self._params(pl_module)
        big = float(self._sqnorm([p.grad for p in params if p.grad is not None]))
        mean_small = float(torch.stack(small).mean())
        value = self.tracker.update(mean_small, big, sizes[0], sizes[0] * self._k, step=trainer.global_step)
        pl_module.log(self.name, value, on_step=True, on_epoch=False, prog_bar=self.prog_bar, batch_size=sizes[0] * self._k)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prev, self._small = None, []

    def state_dict(self) -> dict[str, Any]:
        return {"ema_g2": self.tracker.ema_g2, "ema_tr_sigma": self.tracker.ema_tr_sigma, "updates": self.tracker.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.ema_g2 = float(state_dict["ema_g2"])
        self.tracker.ema_tr_sigma = float(state_dict["ema_tr_sigma"])
        self.tracker.updates = int(state_dict["updates"])
