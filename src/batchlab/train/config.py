"""Configuration and result of one training run."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from batchlab.tasks.optimizers import OPTIMIZERS

SCHEDULES = ("constant", "step", "cosine")
STATUSES = ("ok", "diverged", "oom", "failed")
LR_RULES = ("linear", "sqrt", "none")  # batch-size rules that scale the LR only (see optim.scale_hparams)
ADAM_RULES = ("adam-sde", "adam-halflife")  # rules that also scale Adam's betas / eps
SCALE_RULES = LR_RULES + ADAM_RULES

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
    # (examples seen, batch_size) pairs, increasing: from that many training examples on, batch_size
    # is the pair's (before the first: batch_size above). A measured batch-size warmup
    # (batchlab.batchsize.BatchSizeSchedule); LR, Adam betas and eps are co-scaled from batch_size.
    batch_schedule: tuple[tuple[int, int], ...] = ()
    batch_scale_rule: str | None = None  # co-scaling rule for batch_schedule (SCALE_RULES); None: the optimizer's default
    accumulation: int = 1  # micro-batches per optimizer step (each of batch_size examples)
    eval_every: int = 0  # evaluate every N steps; 0: at the end of every epoch (a stream without a length: 10 times)
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
        # Every field is checked here, at the boundary: a bad value fails now with its name, what is
        # allowed and what was given, never later inside fit() (or, for growth_factor 0, never).
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("accumulation", self.accumulation)
        if self.lr is not None:
            _check_real("lr", self.lr, "a positive finite number", lambda v: 0 < v < math.inf)
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        _check_real("momentum", self.momentum, "a finite number >= 0", lambda v: 0 <= v < math.inf)
        _check_real("weight_decay", self.weight_decay, "a finite number >= 0", lambda v: 0 <= v < math.inf)
        if self.optimizer == "lbfgs" and self.weight_decay:
            raise ValueError(f"weight_decay is not supported with optimizer 'lbfgs' (allowed: 0); got {self.weight_decay!r}")
        budgets = [b for b in (self.max_steps, self.max_examples) if b is not None]
        if budgets and self.epochs is not None:
            object.__setattr__(self, "epochs", None)
        if self.epochs is None and not budgets:
            raise ValueError("give a budget: epochs, max_steps or max_examples")
        if self.epochs is not None:
            _check_real("epochs", self.epochs, "a positive finite number", lambda v: 0 < v < math.inf)
        if self.max_steps is not None:
            _check_positive_int("max_steps", self.max_steps)
        if self.max_examples is not None:
            _check_positive_int("max_examples", self.max_examples)
        if self.amp_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be None, 'bfloat16' or 'float16'; got {self.amp_dtype!r}")
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("eval_every", self.eval_every, 0)
        _check_int("seed", self.seed, None)
        _check_positive_int("lbfgs_max_iter", self.lbfgs_max_iter)
        _check_positive_int("growth_factor", self.growth_factor)
        for name in ("milestones", "batch_growth"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
                raise ValueError(f"{name} must be a sequence of fractions of the budget in [0, 1], got {value!r}")
            for i, m in enumerate(value):
                _check_real(f"{name}[{i}]", m, "a fraction of the budget in [0, 1]", lambda v: 0 <= v <= 1)
            object.__setattr__(self, name, tuple(float(m) for m in value))
        if self.milestones and self.schedule != "step":  # they would be kept in the config and never used
            raise ValueError(f"milestones apply to schedule='step' only (the LR is multiplied by gamma at each); got "
                             f"schedule={self.schedule!r} with milestones={self.milestones!r}")
        if self.schedule == "step" and not self.milestones:
            raise ValueError("schedule='step' needs milestones (fractions of the budget where the LR is multiplied by "
                             "gamma, e.g. (0.5, 0.75)); got none, which would train at a constant LR")
        object.__setattr__(self, "batch_schedule", _check_batch_schedule(self.batch_schedule))
        if self.batch_schedule and self.batch_growth:
            raise ValueError("give batch_growth (fractions of the budget) or batch_schedule (examples seen), not both; "
                             f"got batch_growth={self.batch_growth!r} and batch_schedule={self.batch_schedule!r}")
        if self.batch_scale_rule is not None and self.batch_scale_rule not in SCALE_RULES:
            raise ValueError(f"batch_scale_rule must be one of {', '.join(SCALE_RULES)} or None (the optimizer's default); "
                             f"got {self.batch_scale_rule!r}")
        if (self.batch_scale_rule in ADAM_RULES and self.optimizer is not None
                and self.optimizer not in ("adam", "adamw")):
            raise ValueError(f"batch_scale_rule {self.batch_scale_rule!r} is for optimizer 'adam' or 'adamw'; "
                             f"got optimizer {self.optimizer!r}")
        _check_real("gamma", self.gamma, "a positive finite factor", lambda v: 0 < v < math.inf)
        if self.grad_clip is not None:
            _check_real("grad_clip", self.grad_clip, "a positive finite gradient norm or None (off)",
                        lambda v: 0 < v < math.inf)
        _check_real("divergence_loss", self.divergence_loss, "a positive number (inf: only a non-finite loss diverges)",
                    lambda v: v > 0)
        for name in ("eval_train", "amp", "drop_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("activation", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.norm is not None and (not isinstance(self.norm, str) or not self.norm):
            raise ValueError(f"norm must be a norm name (see batchlab.norm.known_norms) or None, got {self.norm!r}")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native fields (tuples as lists)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d["batch_schedule"] = [list(p) for p in self.batch_schedule]
        return d

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
        if "batch_schedule" in d and isinstance(d["batch_schedule"], (list, tuple)):
            d["batch_schedule"] = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in d["batch_schedule"])
        return cls(**d)


def _check_batch_schedule(value: Any) -> tuple[tuple[int, int], ...]:
    """``batch_schedule`` as a tuple of ``(examples, batch)`` int pairs, examples >= 0 and increasing."""
    allowed = "a sequence of (examples seen, batch_size) pairs of integers, examples >= 0 and increasing, batch_size >= 1"
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise ValueError(f"batch_schedule must be {allowed}; got {value!r}")
    out: list[tuple[int, int]] = []
    for i, pair in enumerate(value):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"batch_schedule[{i}] must be an (examples seen, batch_size) pair; got {pair!r}")
        _check_int(f"batch_schedule[{i}] examples", pair[0], 0)
        _check_positive_int(f"batch_schedule[{i}] batch_size", pair[1])
        if out and pair[0] <= out[-1][0]:
            raise ValueError(f"batch_schedule examples must increase; got {out[-1][0]} then {pair[0]} at index {i}")
        out.append((int(pair[0]), int(pair[1])))
    return tuple(out)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or (minimum is not None and value < minimum):
        allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_real(name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> None:
    """``value`` must be a real number (not a bool, not NaN) for which ``ok`` holds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or not ok(float(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def last_error_line(error: Any) -> str:
    """The last line of a stored error (a traceback's is the exception), at most 300 characters, or
    "no error recorded"."""
    lines = [ln for ln in str(error or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no error recorded"


@dataclass
class RunResult:
    """What one training run produced. Plain data: serializes to JSON and back."""

    task: str
    config: dict[str, Any]
    status: Status = "ok"
    # one row per evaluation: step, epoch, examples, wall_time, train_time, lr, batch_size (the latest
    # step's batch setting, micro-batch x accumulation), step_examples (the examples it had: fewer at
    # the end of the budget or an epoch), batch_loss, train/val loss and metric, callbacks' logs
    history: list[dict[str, Any]] = field(default_factory=list)
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
