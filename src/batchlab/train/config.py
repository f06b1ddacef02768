"""Configuration and result of one training run."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lbfgs")
SCHEDULES = ("constant", "step", "cosine")
STATUSES = ("ok", "diverged", "oom", "failed")

Status = Literal["ok", "diverged", "oom", "failed"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides one training run besides the task.

    A budget is given by exactly one of ``epochs``, ``max_steps`` or ``max_examples``.
    """

    batch_size: int = 128  # examples per optimizer step (per process), before accumulation
    lr: float | None = None  # None: the task's default LR
    optimizer: str | None = None  # None: the task's default; one of OPTIMIZERS
    momentum: float = 0.9  # for "momentum" and "nesterov"
    weight_decay: float = 0.0
    epochs: float | None = 1.0  # budget in passes over the training set
    max_steps: int | None = None  # budget in optimizer steps
    max_examples: int | None = None  # budget in training examples seen
    schedule: str = "constant"  # one of SCHEDULES
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    milestones: tuple[float, ...] = ()  # "step" schedule: fractions of the budget where LR *= gamma
    gamma: float = 0.1
    batch_growth: tuple[float, ...] = ()  # fractions of the budget where the batch grows by growth_factor
    growth_factor: int = 1  # batch growth factor at each batch_growth milestone (1 = off)
    accumulation: int = 1  # micro-batches per optimizer step (each of batch_size examples)
    eval_every: int = 0  # evaluate every N steps; 0: at the end of every epoch
    eval_train: bool = True  # also record loss/accuracy on (a fixed subset of) the training set
    seed: int = 0
    norm: str | None = None  # norm layer of the model (see batchlab.norm.create_norm); None: the task's default
    activation: str = "relu"
    device: str = "cpu"
    amp: bool = False  # torch.autocast: bfloat16 on CPU, float16 + GradScaler on CUDA
    amp_dtype: str | None = None  # override the autocast dtype: "bfloat16" or "float16" (float16 uses a GradScaler)
    lbfgs_max_iter: int = 5  # inner iterations per batch for optimizer "lbfgs"
    drop_last: bool = False
    grad_clip: float | None = None
    divergence_loss: float = 1e4  # a training loss above this (or non-finite) ends the run as "diverged"

    def __post_init__(self) -> None:
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("accumulation", self.accumulation)
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        budgets = [b for b in (self.max_steps, self.max_examples) if b is not None]
        if budgets and self.epochs is not None:
            object.__setattr__(self, "epochs", None)
        if self.epochs is None and not budgets:
            raise ValueError("give a budget: epochs, max_steps or max_examples")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs!r}")
        if self.max_steps is not None:
            _check_positive_int("max_steps", self.max_steps)
        if self.max_examples is not None:
            _check_positive_int("max_examples", self.max_examples)
        if self.amp_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be None, 'bfloat16' or 'float16'; got {self.amp_dtype!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        object.__setattr__(self, "batch_growth", tuple(float(m) for m in self.batch_growth))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        d = dict(d)
        for k in ("milestones", "batch_growth"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class RunResult:
    """What one training run produced. Plain data: serializes to JSON and back."""

    task: str
    config: dict[str, Any]
    status: Status = "ok"
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation
    final: dict[str, float] = field(default_factory=dict)  # last evaluation's metrics
    wall_time: float = 0.0  # seconds spent in fit(), evaluation included
    train_time: float = 0.0  # seconds spent in training steps only
    steps: int = 0  # optimizer steps taken
    examples: int = 0  # training examples seen
    error: str | None = None  # message for a run that did not end "ok"
    failed_step: int | None = None  # step at which it diverged / ran out of memory / failed
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def metric(self, name: str = "val_acc", default: float = float("nan")) -> float:
        return float(self.final.get(name, default))

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.history if key in row]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> RunResult:
        return cls.from_dict(json.loads(s))
