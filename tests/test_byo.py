"""Bring your own model: three models written as outside code (tests/byo/) through every tool,
on the command line and through the API, and the errors a user task can make."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset

BYO = Path(__file__).resolve().parent / "byo"
sys.path.insert(0, str(BYO))

import cifar_resnet  # noqa: E402
import char_gpt  # noqa: E402
import hf_style  # noqa: E402

from batchlab import Task, TaskError  # noqa: E402
from batchlab.runs import Trial, run_trial  # noqa: E402
from batchlab.train import Callback, TrainConfig, fit  # noqa: E402

SMALL = {
    "cifar_resnet": dict(n_train=128, n_val=64, size=16, width=4),
    "char_gpt": dict(n_chars=6000, n_embd=32, block_size=16),
    "hf_style": dict(n_train=128, n_val=64, max_len=24),
}


def small_task(name: str, **kw) -> Task:
    module = {"cifar_resnet": cifar_resnet, "char_gpt": char_gpt, "hf_style": hf_style}[name]
    return module.make_task(**{**SMALL[name], **kw})


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BYO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "batchlab.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def task_arg(name: str) -> list[str]:
    out = ["--task", f"{name}:make_task"]
    for k, v in SMALL[name].items():
        out += ["--task-arg", f"{k}={v}"]
    return out


# ----------------------------------------------------------------------------------------- API


@pytest.mark.parametrize("name", sorted(SMALL))
def test_fit_on_outside_models(name):
    task = small_task(name)
    r = fit(task, TrainConfig(batch_size=16, max_steps=6, eval_every=3, seed=0))
    assert r.status == "ok", r.error
    assert r.steps == 6 and r.examples == 96
    assert [row["step"] for row in r.history] == [0, 3, 6]
    assert r.extra["metric"] == task.metric_name
    final = r.final
    if name == "char_gpt":  # language modelling: the metric is the validation loss, lower is better
        assert task.metric_name == "loss" and task.higher_is_better is False
        assert final["val_metric"] == final["val_loss"] and "val_acc" not in final
        assert r.history[-1]["val_loss"] < r.history[0]["val_loss"]  # it learns
    else:
        assert task.metric_name == "accuracy" and task.higher_is_better is True
        assert final["val_acc"] == final["val_metric"] and 0.0 <= final["val_acc"] <= 1.0


def test_dataloader_runs_are_deterministic_and_follow_the_plan():
    """Workers prefetch ahead of the loop; a growing batch must still come out exactly as planned,
    and the same seed gives the same run."""
    cfg = TrainConfig(batch_size=8, max_steps=8, batch_growth=(0.5,), growth_factor=2, eval_every=4, seed=3)
    task = small_task("cifar_resnet", num_workers=2)
    a, b = fit(task, cfg), fit(task, cfg)
    assert a.status == b.status == "ok"
    assert [row["batch_size"] for row in a.history] == [0, 8, 16]
    assert a.examples == 4 * 8 + 4 * 16
    assert [row["val_loss"] for row in a.history] == [row["val_loss"] for row in b.history]
    assert [row["batch_loss"] for row in a.history[1:]] == [row["batch_loss"] for row in b.history[1:]]


def test_in_process_loading_equals_worker_loading_without_augmentation():
    """The DataLoader path (2 workers) and the in-process path give the same batches."""
    task0 = small_task("hf_style")
    task2 = small_task("hf_style", num_workers=2)
    cfg = TrainConfig(batch_size=16, max_steps=5, eval_every=5, seed=1)
    r0, r2 = fit(task0, cfg), fit(task2, cfg)
    assert r0.final["val_loss"] == pytest.approx(r2.final["val_loss"], rel=1e-6)
    assert r0.history[-1]["batch_loss"] == pytest.approx(r2.history[-1]["batch_loss"], rel=1e-6)


def test_fingerprint_covers_model_and_data():
    a, b = small_task("cifar_resnet"), small_task("cifar_resnet")
    assert a.fingerprint() == b.fingerprint()  # augmentation does not change it
    assert small_task("cifar_resnet", width=6).fingerprint() != a.fingerprint()  # another model
    assert small_task("cifar_resnet", n_train=120).fingerprint() != a.fingerprint()  # other data
    assert small_task("cifar_resnet", seed=1).fingerprint() != a.fingerprint()  # same size, other images
    v1, v2 = small_task("cifar_resnet", version="v1"), small_task("cifar_resnet", n_train=120, version="v1")
    assert v1.fingerprint()["data"] == v2.fingerprint()["data"] == {"version": "v1"}


class _WeightedCE:
    """A loss object as users write them: its class weights are state, not code."""

    def __init__(self, w: list[float]) -> None:
        self.w = torch.tensor(w)

    def __call__(self, out, batch):  # type: ignore[no-untyped-def]
        return torch.nn.functional.cross_entropy(out, batch[1], weight=self.w)


def test_fingerprint_covers_what_the_loss_and_metric_hold():
    # the same code with other class weights or label smoothing gave the same fingerprint, so suggest
    # resumed the other setting's stored trials and train --out refused a run it had never made
    base = small_task("cifar_resnet", loss=_WeightedCE([1.0] * 10)).fingerprint()
    assert small_task("cifar_resnet", loss=_WeightedCE([1.0] * 10)).fingerprint() == base
    assert small_task("cifar_resnet", loss=_WeightedCE([1.0] * 9 + [19.0])).fingerprint() != base
    smooth = [small_task("cifar_resnet", loss=torch.nn.CrossEntropyLoss(label_smoothing=e)).fingerprint() for e in (0.0, 0.1)]
    assert smooth[0] != smooth[1]
    scale = [small_task("cifar_resnet", loss=lambda out, batch, k=k: k * torch.nn.functional.cross_entropy(out, batch[1]))
             .fingerprint() for k in (1.0, 2.0)]
    assert scale[0] != scale[1]


def test_fingerprint_of_a_loss_object_is_the_same_in_another_process(tmp_path):
    # digests by content, never by an object's address: an interrupted run must find its results again
    code = ("import sys, json; sys.path[:0] = [{byo!r}, {tests!r}]; import torch; from test_byo import small_task, _WeightedCE; "
            "print(json.dumps(small_task('cifar_resnet', loss=_WeightedCE([1.0] * 10), "
            "metric=torch.nn.CrossEntropyLoss(label_smoothing=0.1), higher_is_better=False).fingerprint()['code']))").format(byo=str(BYO), tests=str(Path(__file__).parent))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout


def test_fingerprint_of_a_task_whose_batches_are_a_class_of_the_users_own_is_the_same_in_another_process(tmp_path):
    # the data digest took such a batch's repr, whose address differs in every process: a rerun or a
    # resume of an unchanged task was refused as "another version of task"
    (tmp_path / "objtask.py").write_text(
        "import torch\nfrom batchlab import Task\n"
        "class Batch:\n"
        "    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
        "    def to(self, device):\n        return Batch(self.x.to(device), self.y.to(device))\n"
        "    def __len__(self):\n        return len(self.y)\n"
        "def collate(items):\n    return Batch(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))\n"
        "def make_task():\n    g = torch.Generator().manual_seed(0)\n"
        "    data = [(torch.randn(4, generator=g), i % 2) for i in range(32)]\n"
        "    return Task.from_torch('objbatch', lambda: torch.nn.Linear(4, 2), data, data, collate_fn=collate,\n"
        "        forward=lambda m, b: m(b.x), loss=lambda o, b: torch.nn.functional.cross_entropy(o, b.y), metric='loss')\n")
    code = f"import sys, json; sys.path.insert(0, {str(tmp_path)!r}); import objtask; print(json.dumps(objtask.make_task().fingerprint()))"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout


def test_norm_swap_on_a_plain_model_goes_through_convert_norm():
    task = small_task("cifar_resnet")
    model = task.make_model(norm="group")
    kinds = {type(m).__name__ for m in model.modules()}
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()), kinds
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules()), kinds
    r = fit(task, TrainConfig(batch_size=16, max_steps=2, norm="group"))
    assert r.status == "ok"
    with pytest.raises(TaskError, match="activation='tanh' needs a built-in model"):
        task.make_model(activation="tanh")


def test_precise_bn_and_bn_health_take_the_task_forward():
    from batchlab.norm import bn_health, precise_bn
    from batchlab.train import iterate_batches

    task = small_task("cifar_resnet", num_workers=0)
    model = task.make_model()
    before = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    counts = precise_bn(model, iterate_batches(task, 16, seed=0), 4, forward=task.forward_batch)
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(counts) == len(before) > 0 and all(not torch.equal(x, y) for x, y in zip(before, after))
    report = bn_health(model, task.sample_batch(16, split="val"), forward=task.forward_batch)
    assert report.batch_size == 16 and len(report.layers) == len(before)


def test_trials_travel_as_entry_point_and_arguments():
    from batchlab.tasks import get_task

    task = get_task("hf_style:make_task", **SMALL["hf_style"])
    trial = Trial(task, TrainConfig(batch_size=16, max_steps=2, eval_every=2))
    portable = trial.portable()
    assert portable[0] == "spec" and portable[1] == ("hf_style:make_task", SMALL["hf_style"])
    direct, shipped = run_trial(trial), run_trial(portable)
    assert direct["final"]["val_loss"] == pytest.approx(shipped["final"]["val_loss"], rel=1e-6)


class _Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            x = torch.randn(4, generator=g)
            yield x, int(x.sum() > 0)


def test_an_iterable_dataset_trains_by_steps_and_epochs_need_a_length():
    task = Task.from_torch(name="stream", model=lambda: nn.Linear(4, 2), train=_Stream(), val=_Stream(), lr=0.1)
    r = fit(task, TrainConfig(batch_size=16, max_steps=20, eval_every=10))
    assert r.status == "ok" and r.examples == 320 and r.final["val_acc"] > 0.6
    assert task.size("train") is None and task.size("val") is None  # a stream has no length
    assert small_task("char_gpt").size("val") == len(small_task("char_gpt").val_set)
    with pytest.raises(TaskError, match="task 'stream': _Stream has no length; give a budget in steps or examples"):
        fit(task, TrainConfig(batch_size=16, epochs=1))
    # no epochs to end: "every epoch" (eval_every=0) evaluates ten times over the run, not once at its end
    r = fit(task, TrainConfig(batch_size=16, max_steps=20))
    assert [row["step"] for row in r.history] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]


def test_throughput_and_noise_scale_measure_a_stream_without_a_length():
    # neither needs the training-set size: throughput times steps, noise_scale trains for `steps`
    from batchlab.batchsize import noise_scale, throughput

    task = Task.from_torch(name="stream", model=lambda: nn.Linear(4, 2), train=_Stream(), val=_Stream(), lr=0.1)
    t = throughput(task, [8, 32], repeats=2, max_repeats=2)
    assert t.status == ["ok", "ok"] and t.n_train is None and all(math.isnan(e) for e in t.epoch_time)
    r = noise_scale(task, micro_batch=4, accumulation=2, steps=10)
    assert len(r.history) >= 1


def test_suggest_on_a_stream_without_length_says_what_it_needs():
    from batchlab.batchsize import suggest

    task = Task.from_torch(name="stream", model=lambda: nn.Linear(4, 2), train=_Stream(), val=_Stream(), lr=0.1)
    with pytest.raises(TaskError, match=r"task 'stream': suggest needs the size of the training set .* _Stream has no "
                                        r"__len__; give the IterableDataset a __len__"):
        suggest(task, quick=True, budget_examples=400)


def test_cli_critical_batch_on_a_stream_takes_its_budget_in_examples(tmp_path):
    (tmp_path / "streamtask.py").write_text(
        "import torch, torch.nn as nn\n"
        "from batchlab import Task\n"
        "class S(torch.utils.data.IterableDataset):\n"
        "    def __iter__(self):\n"
        "        g = torch.Generator().manual_seed(0)\n"
        "        for _ in range(400):\n"
        "            x = torch.randn(4, generator=g)\n"
        "            yield x, int(x.sum() > 0)\n"
        "def make_task():\n"
        "    return Task.from_torch(name='stream', model=lambda: nn.Linear(4, 2), train=S(), val=S(), lr=0.1, batch_size=8)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    base = [sys.executable, "-m", "batchlab.cli", "critical-batch", "--task", "streamtask:make_task", "--quick",
            "--threads", "1", "--quiet"]
    p = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "has no length, so a budget in epochs means nothing: give --budget-examples N" in p.stderr, p.stderr
    p = subprocess.run(base + ["--budget-examples", "400", "--factors", "1,2"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "warmup schedule (examples seen, batch) from B=8" in p.stdout


def test_a_finished_folder_is_not_taken_for_a_changed_model(tmp_path):
    # critical-batch used to print the old table ("same settings; nothing was run") after the model changed
    code = ("import torch, torch.nn as nn\n"
            "from batchlab import Task\n"
            "def make_task():\n"
            "    g = torch.Generator().manual_seed(0)\n"
            "    x = torch.randn(256, 4, generator=g)\n"
            "    data = torch.utils.data.TensorDataset(x, (x.sum(1) > 0).long())\n"
            "    return Task.from_torch(name='tiny', model=lambda: nn.Sequential(nn.Linear(4, WIDTH), nn.ReLU(), "
            "nn.Linear(WIDTH, 2)), train=data, val=data, lr=0.1, batch_size=8)\n")
    (tmp_path / "tinytask.py").write_text(code.replace("WIDTH", "16"))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "batchlab.cli", "critical-batch", "--task", "tinytask:make_task", "--quick",
           "--threads", "1", "--quiet", "--budget-examples", "256", "--factors", "1,2", "--out", str(tmp_path / "out")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and "already holds this measurement" in again.stdout, again.stderr
    (tmp_path / "tinytask.py").write_text(code.replace("WIDTH", "4"))
    changed = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert changed.returncode == 2, changed.stdout
    assert "for another version of task 'tiny' (its model, data or code changed since)" in changed.stderr


class _Augmented(Dataset):
    """Random flips in __getitem__, as torchvision transforms do (drawn in the DataLoader's workers)."""

    def __init__(self) -> None:
        self.x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return (self.x[i].flip(0) if torch.rand(()) < 0.5 else self.x[i]), int(self.x[i, 0] > 0)


def test_raw_batches_do_not_depend_on_which_runs_came_before():
    # fit used to set its seed on the task's shared DataLoader source, so the worker seeds (and the
    # augmentation) of a later tool reading batches (the noise scale at a critical-batch checkpoint)
    # depended on which branch had run last: a resumed measurement differed from an uninterrupted one
    from batchlab.train import iterate_batches

    task = Task.from_torch(name="aug", model=lambda: nn.Linear(6, 2), train=_Augmented(), val=_Augmented(),
                           num_workers=2, lr=0.1, batch_size=8)
    first = next(iterate_batches(task, 8, seed=3))
    fit(task, TrainConfig(batch_size=8, max_steps=2, seed=5, eval_every=0))
    again = next(iterate_batches(task, 8, seed=3))
    assert torch.equal(first[0], again[0])


class _LossInTraining(nn.Module):
    """A torchvision-detection-style model: a loss dict in training mode, predictions in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x, y=None):  # type: ignore[no-untyped-def]
        out = self.lin(x)
        if self.training:
            return {"loss": F.cross_entropy(out, y)}
        return out


def test_the_preflight_check_scores_the_metric_on_eval_outputs_only():
    # the metric is only ever computed on eval-mode outputs; a training output (the loss dict) must not be fed to it
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))

    def correct(out, batch):  # type: ignore[no-untyped-def]
        return float((out.argmax(1) == batch[1]).float().mean())

    task = Task.from_torch(name="det-style", model=_LossInTraining, train=data, val=data,
                           forward=lambda m, b: m(b[0], b[1]) if m.training else m(b[0]),
                           loss=lambda out, b: out["loss"] if isinstance(out, dict) else F.cross_entropy(out, b[1]),
                           metric=correct, higher_is_better=True, lr=0.1)
    r = fit(task, TrainConfig(batch_size=8, max_steps=4, eval_every=2))
    assert r.status == "ok" and 0.0 <= r.final["val_metric"] <= 1.0


# --------------------------------------------------------------------------- bad user tasks


class _Pairs(Dataset):
    def __init__(self, n: int = 32, label: int | float = 1, dim: int = 4) -> None:
        self.n, self.label, self.dim = n, label, dim

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((self.dim,), float(i)), self.label


class _LossOnly(nn.Module):
    """A model that computes its loss itself and returns only that."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).square().mean()


def _factory_raises():
    raise RuntimeError("weights file missing")


class _InputIdsOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lin(input_ids)


class _Dicts(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.randn(4), "labels": torch.tensor(i % 2)}


@pytest.mark.parametrize("kw,message", [
    (dict(model=_factory_raises), r"task 'bad': the model factory raised RuntimeError: weights file missing"),
    (dict(loss=lambda out, batch: out.sum(dim=1)), r"task 'bad': the loss must be a scalar .* shape \(4,\)"),
    (dict(metric=lambda out, batch: "high", higher_is_better=True), r"task 'bad': the metric 'metric' must return a number, got str"),
    (dict(train=_Pairs(label=7)), r"task 'bad': labels must be in 0..1 \(the model has 2 outputs\), found 7..7"),
    (dict(train=_Pairs(label=0.5)), r"task 'bad': targets must be integer class indices .* got dtype torch.float"),
    (dict(train=_Pairs(n=0)), r"task 'bad': the training set is empty"),
    # (N, 1, C) logits against (N,) labels: accuracy would broadcast to N x N and exceed 1
    (dict(model=lambda: nn.Sequential(nn.Linear(4, 2), nn.Unflatten(1, (1, 2)))),
     r"task 'bad': the model's logits have shape \(4, 1, 2\) \(classes last\), so the default loss and accuracy "
     r"need targets of shape \(4, 1\), got \(4,\)"),
    (dict(model=lambda: _LossOnly()), r"task 'bad': the model returned a scalar \(.*\), not logits; if it is the loss, "
     r"give loss=lambda out, batch: out"),
    (dict(val=_Pairs(dim=3)), r"task 'bad': the model rejected a validation batch \(\[tensor\(4, 3\) float32, tensor\(4,\) int64\]\): RuntimeError"),
    # a dict batch whose model takes no 'labels' keyword: the way out is named
    (dict(model=lambda: _InputIdsOnly(), train=_Dicts(), val=_Dicts()),
     r"unexpected keyword argument 'labels'; a mapping batch is passed as model\(\*\*batch\).*Task.from_torch\(forward="),
])
def test_bad_user_tasks_fail_before_training_naming_task_and_problem(kw, message):
    args = dict(name="bad", model=lambda: nn.Linear(4, 2), train=_Pairs(), val=_Pairs())
    args.update(kw)
    task = Task.from_torch(**args)
    with pytest.raises(TaskError, match=message):
        fit(task, TrainConfig(batch_size=8, max_steps=1000))


@pytest.mark.parametrize("kw,error,message", [
    (dict(model=42), TypeError, "model must be a zero-argument callable"),
    (dict(metric="f1"), ValueError, "metric must be one of accuracy, loss or a callable"),
    (dict(metric=lambda o, b: 1.0), ValueError, "a callable metric needs higher_is_better=True or False, got None"),
    (dict(metric="loss", higher_is_better=True), ValueError, "metric 'loss' is lower is better"),
    (dict(train=[1, 2, 3][0]), TypeError, "train must be a torch Dataset"),
    (dict(num_workers=-1), ValueError, "num_workers must be an integer >= 0, got -1"),
    (dict(optimizer="rmsprop"), ValueError, "optimizer must be one of sgd, .*got 'rmsprop'"),
    (dict(lr=0), ValueError, "lr must be a positive finite number, got 0"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive integer, got 0"),
])
def test_from_torch_arguments_are_checked(kw, error, message):
    args = dict(name="t", model=lambda: nn.Linear(4, 2), train=_Pairs(), val=_Pairs())
    args.update(kw)
    with pytest.raises(error, match=message):
        Task.from_torch(**args)


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("name", sorted(SMALL))
def test_cli_train(name, tmp_path):
    p = cli("train", *task_arg(name), "--steps", "4", "--batch-size", "8", "--threads", "1", "--quiet",
            "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["status"] == "ok" and summary["steps"] == 4
    assert Path(summary["path"]).is_file()


def test_cli_errors_in_user_code_are_one_line(tmp_path):
    bad = tmp_path / "badtasks.py"
    bad.write_text(
        "import torch, torch.nn as nn\n"
        "from batchlab import Task\n"
        "class D(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 16\n"
        "    def __getitem__(self, i): return torch.ones(4), 5\n"
        "def labels():\n"
        "    return Task.from_torch(name='labels', model=lambda: nn.Linear(4, 2), train=D(), val=D())\n"
        "def raises():\n"
        "    raise OSError('no such data')\n"
    )
    env_path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    for entry, expected in (("labels", "labels must be in 0..1"), ("raises", "raised OSError: no such data")):
        p = subprocess.run([sys.executable, "-m", "batchlab.cli", "train", "--task", f"badtasks:{entry}", "--steps", "2"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": env_path})
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in p.stderr, p.stderr


# ------------------------------------------------------------------------ data-parallel (gloo)


def _hf_task_no_dropout() -> Task:
    import functools

    config = hf_style.TinyBertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return hf_style.make_task(**SMALL["hf_style"], model=functools.partial(hf_style.make_model, config))


def _ddp_worker(rank: int, world: int, init_file: str, out: str, cfg_dict: dict) -> None:
    import torch.distributed as dist

    from batchlab.distributed import DistEnv, fit_ddp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        task, cfg = _hf_task_no_dropout(), TrainConfig.from_dict(cfg_dict)
        torch.manual_seed(0)
        model = task.make_model()
        result = fit_ddp(task, cfg, model=model, env=DistEnv(rank, world, rank), lr_rule="none")
        torch.save({"state": model.state_dict(), "result": result.to_dict()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_on_dict_batches_match_one_process(tmp_path):
    """Each rank loads and pads only its slice of the global batch; the model (padding-invariant)
    then takes the steps one process takes on the whole batch."""
    import torch.multiprocessing as mp

    cfg = TrainConfig(batch_size=8, max_steps=4, eval_every=2, seed=0)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), cfg.to_dict()), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    task = _hf_task_no_dropout()
    torch.manual_seed(0)
    model = task.make_model()
    single = fit(task, cfg.replace(batch_size=16), model=model)
    for r, out in enumerate(ranks):
        worst = max(float((out["state"][k].double() - v.double()).abs().max()) for k, v in model.state_dict().items())
        assert worst < 1e-5, f"rank {r}: parameters differ from one process by {worst:.3g}"
        assert out["result"]["examples"] == single.examples == 64
        for row, srow in zip(out["result"]["history"], single.history, strict=True):
            assert row["batch_loss"] == pytest.approx(srow["batch_loss"], abs=1e-5, nan_ok=True)
            assert row["val_loss"] == pytest.approx(srow["val_loss"], abs=1e-5)


def test_network_slimming_on_an_outside_resnet():
    from batchlab.slim import slim_task

    task = small_task("cifar_resnet", num_workers=0)
    res = slim_task(task, sparsity=1e-4, prune=0.3, epochs=1, finetune_epochs=0.5, baseline=False, latency_repeats=2)
    assert res.after["params"] < res.before["params"]
    assert 0.1 <= res.slim["removed_fraction"] <= 0.35  # residual-tied channels are pruned together or kept
    assert res.fold_max_diff is not None and res.fold_max_diff < 1e-3
    assert 0.0 <= res.after["val_acc"] <= 1.0


def test_slimming_refuses_a_model_without_tensor_inputs():
    from batchlab.slim import model_inputs

    with pytest.raises(ValueError, match="task 'hf-style-cls': network slimming needs a model that takes one tensor"):
        model_inputs(small_task("hf_style"), 2)


# --------------------------------------------------------------- the batch-size tools, API and CLI


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batch_size_tools_on_outside_models(name):
    from batchlab.batchsize import max_batch_size, noise_scale, throughput

    task = small_task(name, num_workers=0) if name != "char_gpt" else small_task(name)
    mem = max_batch_size(task, high=32, memory_limit=1 << 30)
    assert mem.batch_size is not None and 2 <= mem.batch_size <= 32
    thr = throughput(task, [4, 8], repeats=2, warmup=1)
    assert thr.status == ["ok", "ok"] and all(t > 0 for t in thr.step_time)
    ns = noise_scale(task, steps=3, micro_batch=4, accumulation=2)
    assert ns.status == "ok" and ns.steps == 3 and len(ns.history) == 3


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batch_size_commands_on_outside_models(name):
    for args in (["find-max-batch", "--high", "16"], ["throughput", "--batch-sizes", "4,8", "--json"],
                 ["noise-scale", "--steps", "3", "--micro-batch", "4", "--accumulation", "2", "--quiet"]):
        p = cli(*args, *task_arg(name), "--threads", "1")
        # 3 steps may leave B_simple undefined (|G|^2 <= 0): then noise-scale says so and exits 1
        undefined = args[0] == "noise-scale" and p.returncode == 1 and "B_simple is not defined here" in p.stderr
        assert p.returncode == 0 or undefined, f"{args[0]}: {p.stderr}"
        assert "Traceback" not in p.stderr


@pytest.mark.parametrize("name", sorted(SMALL))
def test_suggest_quick_command_on_outside_models(name, tmp_path):
    """``suggest --quick`` runs end to end on each outside model and writes its report and JSON; a
    recommendation the evidence does not support exits 1 but is still written."""
    extra = [] if name == "char_gpt" else ["--task-arg", "epochs=16"]
    p = cli("suggest", *task_arg(name), *extra, "--quick", "--threads", "1", "--out", str(tmp_path))
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr
    data = json.loads((tmp_path / "suggestion.json").read_text())
    assert (tmp_path / "index.html").is_file()
    assert data["task"] == {"cifar_resnet": "cifar-resnet", "char_gpt": "char-gpt", "hf_style": "hf-style-cls"}[name]
    assert (p.returncode == 0) == (data["status"] == "ok")
    if data["status"] == "ok":
        assert data["batch_size"] in (2, 4, 8, 16, 32, 64, 128) and data["lr"] > 0


def test_accuracy_refuses_targets_that_would_broadcast():
    from batchlab.tasks.task import accuracy

    assert accuracy(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1])) == 0.5
    with pytest.raises(ValueError, match=r"accuracy: logits of shape \(2, 1, 2\) need targets of shape \(2, 1\).*got \(2,\)"):
        accuracy(torch.zeros(2, 1, 2), torch.tensor([1, 1]))


def test_a_norm_swap_on_a_model_without_batchnorm_is_an_error_not_a_no_op():
    task = Task.from_torch(name="ln", model=lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)),
                           train=_Pairs(), val=_Pairs())
    with pytest.raises(TaskError, match=r"task 'ln': norm 'group' replaces the model's BatchNorm layers, but Sequential "
                                        r"has none \(LayerNorm x 1\); a user model keeps its own normalization"):
        fit(task, TrainConfig(batch_size=8, max_steps=2, norm="group"))
    assert fit(task, TrainConfig(batch_size=8, max_steps=2)).status == "ok"  # no --norm: the model as written


class _DictRegression(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x[:, 0].clone()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x": self.x[i], "y": self.y[i]}


class _DictLossModel(nn.Module):
    """Returns a plain dict carrying its own loss, with float targets (a regression)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, y):
        p = self.lin(x).squeeze(-1)
        return {"loss": F.mse_loss(p, y), "logits": p}


def test_a_plain_dict_carrying_its_loss_is_used_as_documented():
    # the check must see out["loss"] as it sees out.loss, not demand integer class labels
    task = Task.from_torch("reg", model=_DictLossModel, train=_DictRegression(128), val=_DictRegression(32),
                           metric="loss", optimizer="sgd", lr=0.1, batch_size=16)
    r = fit(task, TrainConfig(batch_size=16, lr=0.1, epochs=2))
    assert r.status == "ok" and r.final["val_loss"] < 0.2


# ------------------------------------------------------------------ the user's own optimizer


class _Seen(Callback):
    """The optimizer each step ran with: groups' lr, weight decay and betas."""

    def __init__(self) -> None:
        self.rows: list[list[tuple[float, float, tuple[float, float]]]] = []

    def on_step_end(self, ctx) -> None:  # type: ignore[no-untyped-def]
        self.rows.append([(g["lr"], g["weight_decay"], tuple(g["betas"])) for g in ctx.optimizer.param_groups])


def test_a_nanogpt_configure_optimizers_trains_with_its_groups_and_keeps_their_ratio():
    def nanogpt_optimizer(model, lr):
        opt = model.configure_optimizers(0.1, lr, (0.9, 0.95), "cpu")
        opt.param_groups[1]["lr"] = lr / 2  # a second group at its own LR, as layer-wise schemes do
        return opt

    task = small_task("char_gpt", optimizer=nanogpt_optimizer, lr=1e-3)
    assert task.optimizer == "adamw" and task.optimizer_fn is not None
    seen = _Seen()
    cfg = TrainConfig(batch_size=8, max_steps=6, seed=0, schedule="cosine", batch_schedule=((16, 16),))
    r = fit(task, cfg, callbacks=[seen])
    assert r.ok and r.extra["optimizer"] == "adamw"
    for groups in seen.rows:
        (lr0, wd0, b0), (lr1, wd1, b1) = groups
        assert (wd0, wd1) == (0.1, 0.0) and lr1 == pytest.approx(lr0 / 2)  # the user's groups, ratio kept
        assert b0[0] == 0.9 and b0 == b1
    first, late = seen.rows[0][0], seen.rows[-1][0]
    assert first[2] == (0.9, 0.95) and late[2][1] == pytest.approx(0.95**2)  # adam-halflife at batch 16 = 2 x 8
    # a named optimizer still overrides the task's own
    assert fit(task, cfg.replace(optimizer="sgd", lr=0.1, batch_schedule=())).extra["optimizer"] == "sgd"


def test_an_optimizer_class_or_partial_is_built_on_the_parameters():
    import functools

    task = small_task("char_gpt", optimizer=functools.partial(torch.optim.AdamW, betas=(0.8, 0.9)), lr=2e-3)
    seen = _Seen()
    assert fit(task, TrainConfig(batch_size=8, max_steps=2, seed=0), callbacks=[seen]).ok
    assert seen.rows[0] == [(2e-3, 0.01, (0.8, 0.9))]  # torch's AdamW default weight decay, the user's betas
    assert small_task("char_gpt", optimizer=torch.optim.SGD, lr=0.1).optimizer == "sgd"
    fp = small_task("char_gpt", optimizer=functools.partial(torch.optim.AdamW, betas=(0.8, 0.99))).fingerprint()
    assert fp != task.fingerprint()  # other betas: other results, not the stored ones


class _Lion(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4):  # type: ignore[no-untyped-def]
        super().__init__(params, {"lr": lr})


@pytest.mark.parametrize("optimizer, error, message", [
    (lambda m, lr: torch.optim.AdamW(m.parameters(), lr=3e-4), ValueError, "first parameter group's learning rate"),
    (lambda m, lr: "adamw", TypeError, "must return a torch.optim.Optimizer"),
    (_Lion, ValueError, "_Lion, whose batch-size scaling rule batchlab does not know"),
    (lambda m: None, ValueError, "raised TypeError"),
    ("adamx", ValueError, "optimizer must be one of"),
])
def test_a_bad_optimizer_is_refused_when_the_task_is_made(optimizer, error, message):
    with pytest.raises(error, match=message):
        small_task("char_gpt", optimizer=optimizer, lr=1e-3)


def test_weight_decay_is_the_optimizer_factorys_own():
    task = small_task("char_gpt", optimizer=torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ValueError, match="sets its weight decay; got weight_decay=0.1"):
        fit(task, TrainConfig(batch_size=8, max_steps=2, seed=0, weight_decay=0.1))


class _R2:
    """A metric that is not a mean of per-batch values: R^2 over the whole validation set."""

    name = "r2"

    def reset(self) -> None:
        self.y: list[torch.Tensor] = []
        self.p: list[torch.Tensor] = []

    def update(self, out, batch) -> None:  # type: ignore[no-untyped-def]
        self.p.append(out.detach().flatten())
        self.y.append(batch[1].flatten())

    def compute(self) -> float:
        y, p = torch.cat(self.y), torch.cat(self.p)
        return float(1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def test_a_metric_object_is_pooled_over_the_whole_validation_set():
    from torch.utils.data import TensorDataset

    from batchlab.train import evaluate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = x[:, 0] * 2 + 0.3 * torch.randn(200, generator=g)
    val = TensorDataset(x[150:], y[150:])
    task = Task.from_torch(name="reg", model=lambda: nn.Sequential(nn.Linear(5, 1), nn.Flatten(0)),
                           train=TensorDataset(x[:150], y[:150]), val=val,
                           loss=lambda out, b: F.mse_loss(out, b[1]), metric=_R2(), higher_is_better=True, lr=0.05)
    assert task.metric_name == "r2"
    torch.manual_seed(0)
    model = task.make_model()
    with torch.no_grad():
        want = _R2()
        want.reset()
        want.update(model(x[150:]), (x[150:], y[150:]))
    got = [evaluate(model, val, task, batch_size=b)[1] for b in (1, 4, 50)]
    assert got == pytest.approx([want.compute()] * 3, abs=1e-6)  # a mean of per-batch R^2 moved with the batch
    r = fit(task, TrainConfig(batch_size=4, epochs=3, seed=0))
    assert r.ok and r.metric("val_metric") > 0.9
    with pytest.raises(ValueError, match="a metric object needs higher_is_better"):
        Task.from_torch(name="reg", model=lambda: nn.Linear(5, 1), train=val, val=val, metric=_R2())


class _Seg(Dataset):
    def __init__(self, void: bool = False) -> None:
        self.void = void

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        y = torch.full((6, 6), -100) if self.void else torch.randint(0, 3, (6, 6))
        return torch.randn(2, 6, 6), y


def test_segmentation_outputs_get_a_message_that_says_what_to_give():
    task = Task.from_torch(name="seg", model=lambda: nn.Conv2d(2, 3, 1), train=_Seg(), val=_Seg())
    with pytest.raises(TaskError, match=r"classes in dimension 1, one score per position, .* give loss="):
        fit(task, TrainConfig(batch_size=4, max_steps=1))


def test_a_validation_set_of_ignored_targets_only_is_an_error_not_nan():
    from batchlab.train import evaluate

    task = Task.from_torch(name="void", model=lambda: nn.Sequential(nn.Conv2d(2, 3, 1), _ChannelsLast()),
                           train=_Seg(), val=_Seg(void=True), metric="loss")
    with pytest.raises(TaskError, match="every target in the 8 example"):
        evaluate(task.make_model(), task.val_source, task)


class _ChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def test_the_optimizer_factory_gets_the_users_module_inside_wrappers():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    class Wrapper(nn.Module):  # DistributedDataParallel, DataParallel, batchlab's rank shard
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    def groups(model, lr):  # reads the user's attributes, as nanoGPT's configure_optimizers does
        return torch.optim.SGD([{"params": model.head.parameters()},
                                {"params": model.backbone.parameters(), "lr": lr / 10}], lr=lr)

    task = Task.from_torch(name="wrapped", model=Net, train=_Pairs(), val=_Pairs(), optimizer=groups, lr=0.1)
    net = Net()
    opt = task.build_optimizer(Wrapper(Wrapper(net)), 0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, pytest.approx(0.01)]
    assert opt.param_groups[0]["params"][0] is net.head.weight


def test_a_metric_object_without_reset_is_refused_not_taken_as_a_callable():
    class NoReset:
        def update(self, out, batch) -> None:  # type: ignore[no-untyped-def]
            pass

        def compute(self) -> float:
            return 0.5

        def __call__(self, out, batch) -> float:  # type: ignore[no-untyped-def]
            return 0.5

    with pytest.raises(TypeError, match="has no reset"):
        Task.from_torch(name="m", model=lambda: nn.Linear(4, 2), train=_Pairs(), val=_Pairs(), metric=NoReset(),
                        higher_is_better=True)


def test_float_targets_with_a_loss_given_blame_the_accuracy_not_the_loss():
    # multi-label targets with loss= given and metric="accuracy": the message named "the default loss
    # and accuracy" and asked for loss= the user had already given
    from batchlab import Task
    from batchlab.tasks import TaskError

    data = [(torch.randn(4), torch.tensor([1.0, 0.0, 1.0])) for _ in range(16)]
    bce = lambda out, batch: F.binary_cross_entropy_with_logits(out, batch[1])  # noqa: E731
    task = Task.from_torch("multilabel", lambda: nn.Linear(4, 3), data, data, loss=bce, metric="accuracy")
    with pytest.raises(TaskError, match=r"integer class indices for accuracy, got dtype torch.float32 .*give a metric of "
                                        r"your own"):
        task.check()
