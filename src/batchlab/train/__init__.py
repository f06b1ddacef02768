"""Training: ``fit(task, TrainConfig) -> RunResult``, optimizers, LR rules and schedules."""

from batchlab.train.config import OPTIMIZERS, SCHEDULES, RunResult, TrainConfig
from batchlab.train.loop import Callback, StepContext, evaluate, fit, iterate_batches
from batchlab.train.oom import is_oom
from batchlab.train.optim import LR_RULES, default_lr_rule, lr_factor, make_optimizer, scale_lr

__all__ = [
    "OPTIMIZERS", "SCHEDULES", "LR_RULES", "RunResult", "TrainConfig", "Callback", "StepContext",
    "evaluate", "fit", "iterate_batches", "is_oom", "default_lr_rule", "lr_factor", "make_optimizer", "scale_lr",
]
