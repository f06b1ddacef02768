"""GradientNoiseScaleCallback with a tiny LightningModule on CPU (skipped without the extra)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="the 'lightning' extra is not installed (pip install 'batchlab[lightning]')")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from batchlab.batchsize.noise import unbiased_norms  # noqa: E402
from batchlab.integrations.lightning import GradientNoiseScaleCallback, default_batch_size  # noqa: E402

MICRO, K = 8, 4


class Tiny(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long() + (x[:, 1] > 1).long()
    return TensorDataset(x, y)


def _trainer(tmp_path: Path, steps: int, k: int = K) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps, accumulate_grad_batches=k, accelerator="cpu", devices=1,
        logger=CSVLogger(tmp_path, name="gns"), enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, log_every_n_steps=1, deterministic=True,
    )


def test_logs_b_simple_and_matches_direct_gradients(tmp_path: Path) -> None:
    data = _data()
    steps = 5
    cb = GradientNoiseScaleCallback(beta=0.5)
    module = Tiny(lr=0.0)  # parameters stay put, so each step's gradients can be recomputed below
    trainer = _trainer(tmp_path, steps)
    trainer.callbacks.append(cb)
    trainer.fit(module, DataLoader(data, batch_size=MICRO, shuffle=False))

    assert cb.tracker.updates == steps
    # independent computation: per-micro-batch gradients with autograd, no accumulation tricks
    ref = Tiny(lr=0.0)
    for s, point in enumerate(cb.tracker.history):
        micro = []
        for i in range(K):
            lo = (s * K + i) * MICRO
            x, y = data.tensors[0][lo : lo + MICRO], data.tensors[1][lo : lo + MICRO]
            grads = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x), y), list(ref.parameters()))
            micro.append(torch.cat([g.reshape(-1) for g in grads]).double())
        small = float(torch.stack([m.square().sum() for m in micro]).mean())
        big = float(torch.stack(micro).mean(0).square().sum())
        g2, trs = unbiased_norms(small, big, MICRO, MICRO * K)
        assert point.g2 == pytest.approx(g2, rel=1e-5, abs=1e-9), f"step {s}: |G|^2 {point.g2} vs {g2}"
        assert point.tr_sigma == pytest.approx(trs, rel=1e-5), f"step {s}: tr(Sigma) {point.tr_sigma} vs {trs}"

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [float(r["b_simple"]) for r in rows if r.get("b_simple")]
    assert len(logged) == steps, f"expected one b_simple per step, got {logged}"
    assert logged[-1] == pytest.approx(cb.b_simple, rel=1e-6)
    assert math.isfinite(cb.b_simple) and cb.b_simple > 0


def test_training_run_skips_short_windows(tmp_path: Path) -> None:
    """100 examples in micro-batches of 8: 13 per epoch, so every epoch ends with a 1-batch window
    (and a 4-example batch) that the callback must skip."""
    cb = GradientNoiseScaleCallback(beta=0.9, every=1)
    trainer = _trainer(tmp_path, steps=8)
    trainer.callbacks.append(cb)
    trainer.fit(Tiny(lr=0.1), DataLoader(_data(100), batch_size=MICRO, shuffle=True))
    assert trainer.global_step == 8
    assert cb.tracker.updates == 6  # steps 0-2 and 4-6 are full windows; steps 3 and 7 are short tails


def test_needs_accumulation(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, steps=1, k=1)
    trainer.callbacks.append(GradientNoiseScaleCallback())
    with pytest.raises(ValueError, match="accumulate_grad_batches=1"):
        trainer.fit(Tiny(lr=0.1), DataLoader(_data(64), batch_size=MICRO))


def test_arguments_and_batch_size() -> None:
    with pytest.raises(ValueError, match="beta must be in"):
        GradientNoiseScaleCallback(beta=1.0)
    assert default_batch_size((torch.zeros(3, 2), torch.zeros(3))) == 3
    assert default_batch_size({"x": torch.zeros(5, 1)}) == 5
    with pytest.raises(TypeError, match="batch_size_fn"):
        default_batch_size("text")
