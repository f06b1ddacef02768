"""Training: ``fit(task, TrainConfig) -> RunResult``, optimizers, LR rules and schedules."""

from batchlab.train.config import OPTIMIZERS, SCALE_RULES, SCHEDULES, RunResult, TrainConfig, last_error_line
from batchlab.train.loop import Callback, StepContext, eval_batch_size, evaluate, fit, iterate_batches
from batchlab.train.oom import is_oom
from batchlab.train.optim import (
    LR_RULES,
    default_hparam_rule,
    default_lr_rule,
    group_hparams,
    lr_factor,
    make_optimizer,
    optimizer_hparams,
    scale_group_hparams,
    scale_hparams,
    scale_lr,
    set_hparams,
)

__all__ = [
    "OPTIMIZERS", "SCALE_RULES", "SCHEDULES", "LR_RULES", "RunResult", "TrainConfig", "Callback", "StepContext",
    "eval_batch_size", "evaluate", "fit", "iterate_batches", "is_oom", "default_hparam_rule", "default_lr_rule", "lr_factor",
    "make_optimizer", "optimizer_hparams", "group_hparams", "scale_hparams", "scale_group_hparams", "scale_lr", "set_hparams", "last_error_line",
]
