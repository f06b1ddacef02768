"""GradientNoiseScaleCallback and BatchSizeTuner with a tiny LightningModule on CPU (skipped without the extra)."""

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
from batchlab.integrations.lightning import BatchSizeTuner, GradientNoiseScaleCallback, default_batch_size  # noqa: E402

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


def _halves_reference(module_state: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    ref = Tiny(lr=0.0)
    ref.load_state_dict(module_state)
    h = x.shape[0] // 2
    gs = []
    for lo, hi in ((0, h), (h, 2 * h)):
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x[lo:hi]), y[lo:hi]), list(ref.parameters()))
        gs.append(torch.cat([g.reshape(-1) for g in grads]).double())
    small = float((gs[0].square().sum() + gs[1].square().sum()) / 2)
    big = float(((gs[0] + gs[1]) / 2).square().sum())
    return unbiased_norms(small, big, h, 2 * h)


def test_no_accumulation_splits_the_batch(tmp_path: Path) -> None:
    data = _data()
    steps = 4
    cb = GradientNoiseScaleCallback(beta=0.5)
    module = Tiny(lr=0.0)
    trainer = _trainer(tmp_path, steps, k=1)
    trainer.callbacks.append(cb)
    trainer.fit(module, DataLoader(data, batch_size=MICRO, shuffle=False))
    assert cb.tracker.updates == steps and cb.modes == {"accumulation": 0, "split": steps}
    for s, point in enumerate(cb.tracker.history):
        x, y = data.tensors[0][s * MICRO:(s + 1) * MICRO], data.tensors[1][s * MICRO:(s + 1) * MICRO]
        g2, trs = _halves_reference(module.state_dict(), x, y)
        assert point.g2 == pytest.approx(g2, rel=1e-5, abs=1e-9) and point.tr_sigma == pytest.approx(trs, rel=1e-5)
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    assert len([r for r in rows if r.get("b_simple")]) == steps
    # the extra forward/backward changes nothing in training: same parameters as without the callback
    trained, plain = Tiny(lr=0.1), Tiny(lr=0.1)
    t1 = _trainer(tmp_path, steps, k=1)
    t1.callbacks.append(GradientNoiseScaleCallback())
    t1.fit(trained, DataLoader(data, batch_size=MICRO, shuffle=False))
    _trainer(tmp_path, steps, k=1).fit(plain, DataLoader(data, batch_size=MICRO, shuffle=False))
    for (name, a), b in zip(trained.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_with_an_accumulation_scheduler(tmp_path: Path) -> None:
    """k = 1 in epoch 0 (split), k = 2 from epoch 1 (micro-batch gradients)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    cb = GradientNoiseScaleCallback(beta=0.9)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, deterministic=True,
                         callbacks=[GradientAccumulationScheduler({0: 1, 1: 2}), cb])
    trainer.fit(Tiny(lr=0.1), DataLoader(_data(64), batch_size=MICRO))  # 8 batches per epoch
    assert trainer.global_step == 8 + 4
    assert cb.modes == {"split": 8, "accumulation": 4} and cb.tracker.updates == 12


# ------------------------------------------------------------------ the tuner
class TinyDM(pl.LightningDataModule):
    def __init__(self, n: int, batch_size: int = 4) -> None:
        super().__init__()
        self.data, self.batch_size = _data(n), batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


class Seen(pl.Callback):
    """The module's state when training starts and every training batch size."""

    def __init__(self) -> None:
        self.state: dict | None = None
        self.sizes: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.append(batch[0].shape[0])


class WarmupTiny(Tiny):
    """configure_optimizers as Lightning users write it: a scheduler sized from the Trainer, a warmup
    that starts the LR at a tenth."""

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, 0.1 + step / max(1, total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _tune(tmp_path: Path, tuner: BatchSizeTuner, n: int = 256, steps: int = 2, module_cls: type = Tiny, **kw):
    module, dm, seen = module_cls(lr=0.1), TinyDM(n), Seen()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[tuner, seen], **kw)
    trainer.fit(module, datamodule=dm)
    return module, dm, seen, before, trainer


def test_tuner_memory_mode_sets_batch_and_lr_and_restores_the_module(tmp_path: Path) -> None:
    free = BatchSizeTuner(memory_limit=2**40)
    module, dm, seen, before, _ = _tune(tmp_path, free, n=100)
    assert free.result["batch_size"] == 100 and free.result["measured"]["capped_by"] == "data"  # never past the data
    m = free.result["measured"]
    limit = int((m["fixed_bytes"] + m["per_sample_bytes"] * 40) / 0.9)  # room for ~40 within the 10% margin
    tuner = BatchSizeTuner(memory_limit=limit)
    module, dm, seen, before, trainer = _tune(tmp_path, tuner)
    r = tuner.result
    assert r["batch_size"] == 32 and dm.batch_size == 32 and seen.sizes == [32, 32]  # the loaders use it
    assert r["measured"]["margin"] == 0.1 and r["measured"]["budget_bytes"] == pytest.approx(limit * 0.9)
    assert r["old_lr"] == 0.1 and module.lr == pytest.approx(0.1 * 32 / 4) == r["lr"]  # linear rule for SGD
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.8)  # optimizers rebuilt with it
    for k, v in before.items():  # the tuner measured on a copy: the module starts training as it was
        assert torch.equal(seen.state[k], v), k


def test_tuner_suggest_mode(tmp_path: Path) -> None:
    # the Trainer stops after one step here (max_steps=1), which is also suggest's budget unless told otherwise
    tuner = BatchSizeTuner("suggest", store=tmp_path / "store", suggest_kwargs={"budget_epochs": 20})
    module, dm, seen, _, trainer = _tune(tmp_path, tuner, n=256, steps=1, max_epochs=20)
    r = tuner.result
    s = r["measured"]
    assert dm.batch_size == r["batch_size"] == s["micro_batch"] and module.lr == pytest.approx(s["lr"])
    assert trainer.accumulate_grad_batches == s["accumulation"] == r["accumulation"]
    assert seen.sizes == [r["batch_size"]] * r["accumulation"]


def test_tuner_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be one of memory, suggest, got 'power'"):
        BatchSizeTuner("power")
    with pytest.raises(ValueError, match="lr_rule must be one of linear, sqrt, none, got 'cube'"):
        BatchSizeTuner(lr_rule="cube")
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, callbacks=[BatchSizeTuner(batch_arg_name="bs")])
    with pytest.raises(ValueError, match="'bs' is not an attribute of the module"):
        trainer.fit(Tiny(lr=0.1), datamodule=TinyDM(32))


def test_arguments_and_batch_size() -> None:
    with pytest.raises(ValueError, match="beta must be in"):
        GradientNoiseScaleCallback(beta=1.0)
    assert default_batch_size((torch.zeros(3, 2), torch.zeros(3))) == 3
    assert default_batch_size({"x": torch.zeros(5, 1)}) == 5
    with pytest.raises(TypeError, match="batch_size_fn"):
        default_batch_size("text")


def _task_suggest_gets(tmp_path: Path, monkeypatch, **kw):  # type: ignore[no-untyped-def]
    """The task BatchSizeTuner("suggest") hands to suggest (stopped there)."""
    import batchlab.batchsize as bs

    seen = []

    def fake_suggest(task, **_):  # type: ignore[no-untyped-def]
        seen.append(task)
        raise RuntimeError("stop here")

    monkeypatch.setattr(bs, "suggest", fake_suggest)
    with pytest.raises(RuntimeError, match="stop here"):
        _tune(tmp_path, BatchSizeTuner("suggest"), n=64, **kw)
    return seen[0]


def test_tuner_counts_accumulation_in_the_batch_the_lr_goes_with(tmp_path: Path, monkeypatch) -> None:
    # the module's LR was set for loader batch x accumulation examples per step: the task says so
    assert _task_suggest_gets(tmp_path, monkeypatch, accumulate_grad_batches=4).batch_size == 16  # TinyDM's 4 x 4
    monkeypatch.undo()
    # memory mode: with accumulation 2 a loader batch may take at most half the training set
    free = BatchSizeTuner(memory_limit=2**40)
    _tune(tmp_path, free, n=100, accumulate_grad_batches=2)
    assert free.result["batch_size"] == 50 and free.result["accumulation"] == 2


def _fake_suggest(monkeypatch, micro: int, accumulation: int, lr: float) -> None:  # type: ignore[no-untyped-def]
    """suggest() replaced by one that returns this recommendation (what the tuner reads of it)."""
    import batchlab.batchsize as bs

    class FakeSuggestion:
        status, rule, rationale = "ok", "linear", []
        batch_size, micro_batch = micro * accumulation, micro

        def to_dict(self):  # type: ignore[no-untyped-def]
            return {"batch_size": self.batch_size}

    FakeSuggestion.accumulation, FakeSuggestion.lr = accumulation, lr
    monkeypatch.setattr(bs, "suggest", lambda *a, **k: FakeSuggestion())


def test_tuner_suggest_mode_capped_by_max_batch_keeps_the_step_and_rescales_the_lr(tmp_path: Path, monkeypatch) -> None:
    _fake_suggest(monkeypatch, 64, 1, 0.8)
    tuner = BatchSizeTuner("suggest", max_batch=16)
    module, dm, seen, _, trainer = _tune(tmp_path, tuner, n=256, steps=1)
    r = tuner.result
    assert r["batch_size"] == 16 == dm.batch_size and r["accumulation"] == 4 == trainer.accumulate_grad_batches
    assert r["lr"] == pytest.approx(0.8) == module.lr  # 16 x 4 = the recommended 64 examples per step
    tuner = BatchSizeTuner("suggest", max_batch=24)  # 64 / 24 -> 3 micro-batches of 24 = 72 examples
    module, dm, seen, _, trainer = _tune(tmp_path, tuner, n=256, steps=1)
    assert tuner.result["accumulation"] == 3 and tuner.result["lr"] == pytest.approx(0.8 * 72 / 64)


def test_the_tuner_takes_a_scheduler_built_from_the_trainer_and_its_configured_lr(tmp_path: Path, monkeypatch) -> None:
    task = _task_suggest_gets(tmp_path, monkeypatch, module_cls=WarmupTiny)  # not "not attached to a Trainer"
    assert task.lr == pytest.approx(0.1)  # the configured LR, not the warmup's first tenth of it


def test_memory_mode_with_a_schedule_sized_from_the_trainer_trains_at_the_new_batch(tmp_path: Path) -> None:
    # configure_optimizers reading trainer.estimated_stepping_batches makes Lightning build the training
    # loader before any callback runs; the tuner must have it rebuilt at the new batch, and the schedule
    # sized from the new batch's steps (it used to train at the old batch with the LR for the new one, and
    # memory mode raised "not attached to a Trainer")
    steps = []

    class Sized(WarmupTiny):
        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            steps.append(self.trainer.estimated_stepping_batches)
            return super().configure_optimizers()

    free = BatchSizeTuner(memory_limit=2**40, max_batch=32)
    module, dm, seen, _, trainer = _tune(tmp_path, free, n=256, steps=-1, module_cls=Sized, max_epochs=1)
    assert free.result["batch_size"] == 32 == dm.batch_size
    assert seen.sizes == [32] * 8  # 256 examples at 32, not 64 steps at the old 4
    assert steps[-1] == 8 and trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.1 * 32 / 4)


class OneCycleTiny(Tiny):
    """An LR the module keeps under a name of its own, and OneCycleLR (which keeps max_lr / 25 as initial_lr)."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr)
        del self.lr
        self.peak = lr

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.SGD(self.parameters(), lr=self.peak)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.peak, total_steps=1000)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_the_configured_lr_of_a_one_cycle_schedule_is_its_max_lr(tmp_path: Path, monkeypatch) -> None:
    task = _task_suggest_gets(tmp_path, monkeypatch, module_cls=OneCycleTiny)
    assert task.lr == pytest.approx(0.1)  # not OneCycleLR's starting 0.1 / 25


def test_a_module_without_an_lr_attribute_is_told_its_lr_was_not_scaled(tmp_path: Path) -> None:
    tuner = BatchSizeTuner(memory_limit=2**40, max_batch=32)
    with pytest.warns(UserWarning, match="no 'lr' or 'learning_rate' attribute, so the learning rate was left"):
        _tune(tmp_path, tuner, n=64, module_cls=OneCycleTiny)
    assert tuner.result["batch_size"] == 32 and tuner.result["lr"] is None


def test_tuner_memory_arguments_are_checked_when_it_is_made() -> None:
    with pytest.raises(ValueError, match=r"margin must be a number in \[0, 1\), got 2"):
        BatchSizeTuner(margin=2)
    with pytest.raises(ValueError, match="memory_limit must be a positive number of bytes, got -5"):
        BatchSizeTuner(memory_limit=-5)


class MomentumTiny(Tiny):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.5, weight_decay=0.05)


class RMSTiny(Tiny):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(self.parameters(), lr=self.lr)


def test_suggest_trials_train_with_the_modules_own_optimizer_and_its_budget(tmp_path: Path, monkeypatch) -> None:
    # the trials built SGD(momentum 0.9, no decay) for SGD(momentum 0.5, decay 0.05), AdamW for RMSprop,
    # and took one epoch as the budget of a Trainer stopping at max_steps
    task = _task_suggest_gets(tmp_path, monkeypatch, module_cls=MomentumTiny, steps=12)
    opt = task.build_optimizer(task.make_model(), 0.3)
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and g["momentum"] == 0.5 and g["weight_decay"] == 0.05 and g["lr"] == 0.3
    assert task.epochs == pytest.approx(12 * 4 / 64)  # max_steps x batch / examples (the data module's batch 4)
    with pytest.raises(ValueError, match="built RMSprop, whose batch-size scaling rule batchlab does not know"):
        _tune(tmp_path, BatchSizeTuner("suggest"), n=64, module_cls=RMSTiny)


def test_the_tuner_refuses_a_dataloader_given_to_fit(tmp_path: Path) -> None:
    # its batch cannot change: the LR was scaled 4x for a batch the run never trained with
    from torch.utils.data import DataLoader

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, callbacks=[BatchSizeTuner(memory_limit=2**40)])
    module = Tiny(lr=0.1)
    module.batch_size = 16
    with pytest.raises(ValueError, match="the training DataLoader was passed to trainer.fit\\(\\) itself"):
        trainer.fit(module, train_dataloaders=DataLoader(_data(64), batch_size=16))
    assert module.lr == 0.1


def test_suggest_mode_says_why_it_cannot_go_with_a_gradient_accumulation_scheduler(tmp_path: Path, monkeypatch) -> None:
    _fake_suggest(monkeypatch, 4, 4, 0.8)
    with pytest.raises(ValueError, match="Lightning refuses that next to a GradientAccumulationScheduler"):
        _tune_with(tmp_path, BatchSizeTuner("suggest"), pl.callbacks.GradientAccumulationScheduler({0: 1}))


def _tune_with(tmp_path: Path, tuner: BatchSizeTuner, *extra: pl.Callback):  # type: ignore[no-untyped-def]
    module, dm = Tiny(lr=0.1), TinyDM(64)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[tuner, *extra])
    trainer.fit(module, datamodule=dm)
