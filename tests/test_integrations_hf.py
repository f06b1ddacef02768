"""Hugging Face Trainer integration with a tiny randomly initialized BERT (no download)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="the 'hf' extra is not installed (pip install 'batchlab[hf]')")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the 'hf' extra)")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from batchlab.batchsize.noise import unbiased_norms  # noqa: E402
from batchlab.integrations.huggingface import (  # noqa: E402
    GradientNoiseScaleCallback,
    suggest_for_trainer,
    task_from_trainer,
)

MICRO = 8


def _config() -> BertConfig:
    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class Tokens(torch.utils.data.Dataset):
    """Variable-length token lists with a label and a text column the model does not take."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            ids = torch.randint(2, 100, (int(torch.randint(4, 24, (1,), generator=g)),), generator=g)
            self.items.append({"input_ids": ids.tolist(), "label": int(ids.float().mean() > 50), "text": "raw"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def pad_collate(features: list[dict]) -> dict:
    if any("text" in f for f in features):
        raise TypeError("a string column reached the collator")
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["label"] for f in features])}


def _trainer(tmp_path, k: int, steps: int, lr: float = 0.0, callbacks=(), **kw) -> Trainer:
    torch.manual_seed(0)
    model = BertForSequenceClassification(_config())
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=k,
        max_steps=steps, learning_rate=lr, weight_decay=0.0, report_to=[], use_cpu=True, logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_drop_last=True, **kw)
    return Trainer(model=model, args=args, train_dataset=Tokens(96, 1), eval_dataset=Tokens(32, 2),
                   data_collator=pad_collate, callbacks=list(callbacks))


class _Record:
    """Records every training batch the model sees (an independent witness for the reference)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.batches: list[dict] = []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.batches.append({k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v) and v.dim() > 0})


def _flat_grad(model, batch) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]).double()


def test_noise_scale_from_micro_batches_before_clipping(tmp_path) -> None:
    k, steps = 4, 3
    cb = GradientNoiseScaleCallback(beta=0.5)
    # lr=0 keeps the parameters put; max_grad_norm=1e-3 clips hard: reading clipped gradients would be wrong
    trainer = _trainer(tmp_path, k, steps, callbacks=[cb], max_grad_norm=1e-3)
    rec = _Record(trainer.model)
    trainer.train()
    assert cb.mode == "accumulation" and cb.tracker.updates == steps
    ref = BertForSequenceClassification(_config())
    ref.load_state_dict(trainer.model.state_dict())
    ref.train()
    assert len(rec.batches) == steps * k
    for s, point in enumerate(cb.tracker.history):
        micro = [_flat_grad(ref, rec.batches[s * k + i]) for i in range(k)]
        small = float(torch.stack([m.square().sum() for m in micro]).mean())
        big = float(torch.stack(micro).mean(0).square().sum())
        g2, trs = unbiased_norms(small, big, MICRO, MICRO * k)
        assert point.g2 == pytest.approx(g2, rel=1e-4), f"step {s}: |G|^2 {point.g2} vs {g2}"
        assert point.tr_sigma == pytest.approx(trs, rel=1e-4), f"step {s}: tr(Sigma) {point.tr_sigma} vs {trs}"
    logged = [row["b_simple"] for row in trainer.state.log_history if "b_simple" in row]
    assert logged == pytest.approx([p.b_simple for p in cb.tracker.history], nan_ok=True)


def test_noise_scale_of_a_padded_causal_lm_normalizing_by_num_items_in_batch(tmp_path) -> None:
    # the model divides each micro-batch's token-loss sum by the window's token count, so a
    # micro-batch contributes (its tokens / total) x its per-token gradient; the callback took the
    # contributions for equal shares (B_simple 1.97 where the same gradients give 1.54)
    from transformers import GPT2Config, GPT2LMHeadModel

    k, steps = 2, 3
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    def lm_collate(features):  # type: ignore[no-untyped-def]
        batch = pad_collate([{"input_ids": f["input_ids"], "label": 0} for f in features])
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}

    cb = GradientNoiseScaleCallback(beta=0.5)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=k,
        max_steps=steps, learning_rate=0.0, weight_decay=0.0, report_to=[], use_cpu=True, logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_drop_last=True)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": t["input_ids"]} for t in Tokens(96, 1)],
                      data_collator=lm_collate, callbacks=[cb])
    rec = _Record(trainer.model)
    trainer.train()
    assert cb.tracker.updates == steps
    ref = copy.deepcopy(trainer.model).train()
    unequal = 0
    for s, point in enumerate(cb.tracker.history):
        batches = rec.batches[s * k:(s + 1) * k]
        micro = [_flat_grad(ref, b) for b in batches]  # each micro-batch's per-token mean gradient
        tokens = [float((b["labels"][:, 1:] != -100).sum()) for b in batches]
        unequal += tokens[0] != tokens[1]  # padded: the shares differ
        small = float(torch.stack([m.square().sum() for m in micro]).mean())
        big = float((sum(t * m for t, m in zip(tokens, micro)) / sum(tokens)).square().sum())
        g2, trs = unbiased_norms(small, big, MICRO, MICRO * k)
        assert point.g2 == pytest.approx(g2, rel=1e-3) and point.tr_sigma == pytest.approx(trs, rel=1e-3)
    assert unequal >= 1


def test_noise_scale_by_splitting_without_accumulation(tmp_path) -> None:
    steps = 3
    cb = GradientNoiseScaleCallback(beta=0.5)
    trainer = _trainer(tmp_path, 1, steps, lr=1e-3, callbacks=[cb])
    rec = _Record(trainer.model)
    # the parameters at each step, to recompute the halves' gradients independently
    snaps = []
    trainer.add_callback(type("Snap", (transformers.TrainerCallback,), {
        "on_step_begin": lambda self, args, state, control, model=None, **kw: snaps.append(
            {k: v.detach().clone() for k, v in model.state_dict().items()})})())
    trainer.train()
    assert cb.mode == "split" and cb.tracker.updates == steps
    for s, point in enumerate(cb.tracker.history):
        ref = BertForSequenceClassification(_config())
        ref.load_state_dict(snaps[s])
        ref.train()
        batch = [b for b in rec.batches if b["input_ids"].shape[0] == MICRO][s]  # not the callback's halves
        h = MICRO // 2
        g1 = _flat_grad(ref, {k: v[:h] for k, v in batch.items()})
        g2_ = _flat_grad(ref, {k: v[h:] for k, v in batch.items()})
        small = 0.5 * float(g1.square().sum() + g2_.square().sum())
        big = float((0.5 * (g1 + g2_)).square().sum())
        g2, trs = unbiased_norms(small, big, h, MICRO)
        assert point.g2 == pytest.approx(g2, rel=1e-4, abs=1e-9) and point.tr_sigma == pytest.approx(trs, rel=1e-4)
    # the extra forward/backward changed nothing in training: same parameters as a run without the callback
    plain = _trainer(tmp_path, 1, steps, lr=1e-3)
    plain.train()
    for (name, a), b in zip(trainer.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_task_from_trainer_and_suggest(tmp_path) -> None:
    trainer = _trainer(tmp_path, 2, -1, lr=5e-4, num_train_epochs=30)  # the budget: 30 epochs of 96 examples
    task = task_from_trainer(trainer)
    model = task.make_model()
    assert type(model) is BertForSequenceClassification and model is not trainer.model
    assert model.config.hidden_size == 32 and task.optimizer == "adamw" and task.lr == 5e-4
    assert task.batch_size == MICRO * 2 and task.metric_name == "loss" and task.epochs == 30
    # the optimizer as the Trainer builds it: its betas, and weight decay only where the Trainer decays
    trainer.args.weight_decay, trainer.args.adam_beta2 = 0.05, 0.98
    task = task_from_trainer(trainer)
    opt = task.build_optimizer(model, 1e-3)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["betas"] == (0.9, 0.98)
    assert {names[i] for i in decayed} == set(trainer.get_decay_parameter_names(model))
    assert not any("LayerNorm" in names[i] or names[i].endswith("bias") for i in decayed)
    trainer.args.weight_decay = 0.0
    assert task_from_trainer(trainer).fingerprint() != task.fingerprint()  # other settings, other stored results
    batch = task.sample_batch(5)  # the "text" column is dropped before the Trainer's collator, as the Trainer does
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 5
    s = suggest_for_trainer(trainer, quick=True, store=tmp_path / "store", apply=True)
    assert s.per_device_train_batch_size >= 1 and s.gradient_accumulation_steps >= 1 and s.learning_rate > 0
    assert trainer.args.per_device_train_batch_size == s.per_device_train_batch_size
    assert trainer.args.gradient_accumulation_steps == s.gradient_accumulation_steps
    assert trainer.args.learning_rate == s.learning_rate
    assert s.suggestion.batch_size == s.per_device_train_batch_size * s.gradient_accumulation_steps
    print("suggest_for_trainer:", s.to_dict(), f"{s.suggestion.wall_time:.1f} s")


def test_errors(tmp_path) -> None:
    trainer = _trainer(tmp_path, 1, 1)
    trainer.eval_dataset = None
    with pytest.raises(ValueError, match="the Trainer has no eval_dataset"):
        task_from_trainer(trainer)
    with pytest.raises(ValueError, match="beta must be in"):
        GradientNoiseScaleCallback(beta=1.5)


class _TupleRegressor(torch.nn.Module):
    """A custom Trainer model in the return_dict=False style: (loss, predictions), float labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(6, 1)

    def forward(self, features, labels=None):
        pred = self.net(features).squeeze(-1)
        return (pred,) if labels is None else (torch.nn.functional.mse_loss(pred, labels), pred)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x[:, 0] * 2

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("dict_output", [False, True], ids=["tuple", "dict"])
def test_task_from_trainer_takes_the_loss_as_the_trainer_does(tmp_path, dict_output) -> None:
    # Trainer.compute_loss reads out["loss"] or out[0]: so must the task, with float labels
    class Model(_TupleRegressor):
        def forward(self, features, labels=None):
            out = super().forward(features, labels)
            return {"loss": out[0], "logits": out[1]} if dict_output and labels is not None else out

    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=16, num_train_epochs=2,
                             learning_rate=0.05, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                             optim="sgd")
    trainer = Trainer(model_init=Model, args=args, train_dataset=_Rows(128, 0), eval_dataset=_Rows(32, 1))
    task = task_from_trainer(trainer)
    task.check()
    model = task.make_model()
    batch = task.sample_batch(8)
    out = task.forward_batch(model, batch)
    expected = out["loss"] if dict_output else out[0]
    assert torch.equal(task.loss_of(out, batch), expected)


def _causal_lm_task(batch_metric: str):  # type: ignore[no-untyped-def]
    """A tiny GPT-2 on variable-length token sequences, padded by a collator with labels -100."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from batchlab import Task

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 30, (int(n),), generator=g) for n in torch.randint(3, 20, (48,), generator=g)]

    def collate(items):  # type: ignore[no-untyped-def]
        t = max(len(s) for s in items)
        ids = torch.zeros(len(items), t, dtype=torch.long)
        labels = torch.full((len(items), t), -100)
        mask = torch.zeros(len(items), t, dtype=torch.long)
        for i, s in enumerate(items):
            ids[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = s, s, 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    task = Task.from_torch(name="tiny-clm", model=model, train=seqs, val=seqs, collate_fn=collate, metric=batch_metric,
                           optimizer="adamw", lr=1e-3, batch_size=8)
    return task, model, seqs, collate


def test_a_padded_causal_lm_is_scored_per_token_whatever_the_evaluation_batch() -> None:
    from batchlab.train import evaluate

    task, model, seqs, collate = _causal_lm_task("loss")
    with torch.no_grad():  # the reference: every counted next-token prediction once
        full = collate(seqs)
        logits = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
        want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), full["labels"][:, 1:].reshape(-1))
    got = [evaluate(model, seqs, task, batch_size=b)[0] for b in (1, 3, 8, 48)]
    assert got == pytest.approx([float(want)] * 4, rel=1e-5)  # pooled by examples, it moved with the batch size

    task, model, seqs, collate = _causal_lm_task("accuracy")
    with torch.no_grad():
        full = collate(seqs)
        pred = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits[:, :-1].argmax(-1)
        y = full["labels"][:, 1:]
        want_acc = float(((pred == y) & (y != -100)).sum() / (y != -100).sum())  # next-token accuracy
    assert [evaluate(model, seqs, task, batch_size=b)[1] for b in (1, 5, 48)] == pytest.approx([want_acc] * 3)


def test_a_trainers_padded_causal_lm_is_scored_per_token_whatever_the_evaluation_batch(tmp_path) -> None:
    # the Trainer's task took the model's loss through a function of its own, which pooled by examples:
    # the validation loss moved with the evaluation batch (3.4433 / 3.4425 / 3.4418 at 1 / 8 / 100)
    from batchlab.train import evaluate

    _, model, seqs, collate = _causal_lm_task("loss")
    items = [{"input_ids": s} for s in seqs]
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=1,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=items, eval_dataset=items,
                      data_collator=lambda feats: collate([f["input_ids"] for f in feats]))
    task = task_from_trainer(trainer)
    got = [evaluate(model, task.val_source, task, batch_size=b)[0] for b in (1, 7, 48)]
    assert got == pytest.approx([got[-1]] * 3, rel=1e-6)


class _FakeSuggestion:
    """What suggest returns, reduced to what suggest_for_trainer reads."""

    def __init__(self, micro: int = 16, accumulation: int = 1, lr: float = 1e-3, status: str = "ok") -> None:
        self.batch_size, self.micro_batch, self.accumulation = micro * accumulation, micro, accumulation
        self.lr, self.status, self.rule = lr, status, "sqrt"
        self.rationale = ["no candidate beat the trivial baseline"] if status != "ok" else []


def _fake_suggest(monkeypatch, suggestion: _FakeSuggestion) -> None:
    import batchlab.batchsize as bs

    monkeypatch.setattr(bs, "suggest", lambda *a, **k: suggestion)


def test_apply_after_train_reaches_the_optimizer_the_trainer_reuses(tmp_path, monkeypatch) -> None:
    # the documented sequence train() -> suggest_for_trainer(apply=True) -> train(): the Trainer keeps its
    # optimizer (and would build its scheduler again from the optimizer's stale "initial_lr")
    trainer = _trainer(tmp_path, 1, 2, lr=5e-4)
    trainer.train()
    _fake_suggest(monkeypatch, _FakeSuggestion(micro=16, lr=1e-3))
    s = suggest_for_trainer(trainer, apply=True)
    assert s.learning_rate == 1e-3 and trainer.args.learning_rate == 1e-3
    assert all(g["initial_lr"] == pytest.approx(1e-3) for g in trainer.optimizer.param_groups)
    trainer.train()
    assert trainer.lr_scheduler.base_lrs == pytest.approx([1e-3] * len(trainer.optimizer.param_groups))


def test_apply_warns_that_a_scheduler_given_to_the_trainer_was_built_for_the_old_step_count(tmp_path, monkeypatch) -> None:
    # a get_linear_schedule_with_warmup for 20 steps at 8 x 4, applied 16 x 1: 38 steps, 19 of them at LR 0
    import warnings

    model = BertForSequenceClassification(_config())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / 20))
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8, gradient_accumulation_steps=4,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(96, 1), eval_dataset=Tokens(32, 2),
                      data_collator=pad_collate, optimizers=(opt, sched))
    _fake_suggest(monkeypatch, _FakeSuggestion(micro=16, lr=1e-3))
    with pytest.warns(UserWarning, match=r"given its LR scheduler \(LambdaLR\), built for the steps of batch 8 x 4"):
        suggest_for_trainer(trainer, apply=True)
    _fake_suggest(monkeypatch, _FakeSuggestion(micro=16, accumulation=1, lr=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same batch again: nothing to say
        suggest_for_trainer(trainer, apply=True)


def test_apply_leaves_the_trainer_alone_when_the_recommendation_is_not_supported(tmp_path, monkeypatch) -> None:
    trainer = _trainer(tmp_path, 1, 2, lr=5e-4)
    _fake_suggest(monkeypatch, _FakeSuggestion(micro=64, lr=1e-2, status="not supported"))
    with pytest.warns(UserWarning, match="the recommendation is 'not supported'.*left as they were"):
        s = suggest_for_trainer(trainer, apply=True)
    assert s.per_device_train_batch_size == 64  # returned, not applied
    assert trainer.args.per_device_train_batch_size == MICRO and trainer.args.learning_rate == 5e-4


def test_a_model_init_taking_the_trial_as_hugging_face_documents_it(tmp_path) -> None:
    calls = []

    def model_init(trial):  # type: ignore[no-untyped-def]
        calls.append(trial)
        return BertForSequenceClassification(_config())

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=MICRO, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model_init=model_init, args=args, train_dataset=Tokens(32, 1), eval_dataset=Tokens(8, 2),
                      data_collator=pad_collate)
    model = task_from_trainer(trainer).make_model()
    assert isinstance(model, BertForSequenceClassification) and calls[-1] is None


@pytest.mark.parametrize("micro, per_device, lr", [(64, 32, 1e-3), (63, 31, 1e-3 * (62 / 63) ** 0.5)])
def test_under_torchrun_the_global_micro_batch_is_shared_by_the_devices(tmp_path, monkeypatch, micro, per_device, lr) -> None:
    # the task's batch counts every process, so its recommendation is the examples all devices take together
    import batchlab.integrations.huggingface as hf

    trainer = _trainer(tmp_path, 1, 2, lr=5e-4)
    _fake_suggest(monkeypatch, _FakeSuggestion(micro=micro, lr=1e-3))
    monkeypatch.setattr(hf, "_distributed", lambda: (2, 0))
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda box, src=0: None)
    s = suggest_for_trainer(trainer)
    assert s.per_device_train_batch_size == per_device and s.gradient_accumulation_steps == 1
    assert s.learning_rate == pytest.approx(lr)  # 2 x 31 = 62 examples, the LR by the task's rule (sqrt)
