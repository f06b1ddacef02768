"""Batch-size tools: memory maximum, throughput, gradient noise scale, pivot search and ``suggest``.

``from batchlab.batchsize import max_batch_size, throughput, noise_scale, pivot_search, suggest``.
"""

from batchlab.batchsize.batches import BatchRange, Split, budget_in_examples, pow2_floor, powers_of_two
from batchlab.batchsize.critical import CriticalBatchResult, CriticalPoint, critical_batch, critical_from_losses
from batchlab.batchsize.memory import MaxBatchResult, max_batch_size, power_candidates, search_max_batch
from batchlab.batchsize.halving import plan_rungs, successive_halving
from batchlab.batchsize.noise import (
    GradientNoiseScale,
    NoiseScaleResult,
    noise_from_ranks,
    noise_scale,
    unbiased_norms,
)
from batchlab.batchsize.objective import Objective, SeedStats
from batchlab.batchsize.schedule import BatchSizeSchedule, goyal_warmup_steps, warmup_factor
from batchlab.batchsize.search import PivotResult, Trial, pivot_search, pivot_walk
from batchlab.batchsize.state import preserved_state
from batchlab.batchsize.suggest import Candidate, Suggestion, suggest
from batchlab.batchsize.throughput import ThroughputResult, find_knee, throughput
from batchlab.train import is_oom, scale_lr

__all__ = [
    "BatchSizeSchedule", "Candidate", "CriticalBatchResult", "CriticalPoint", "GradientNoiseScale", "MaxBatchResult",
    "NoiseScaleResult", "PivotResult", "critical_batch", "critical_from_losses",
    "Suggestion", "ThroughputResult", "Trial", "find_knee", "goyal_warmup_steps", "is_oom", "max_batch_size",
    "noise_from_ranks", "noise_scale", "pivot_search", "pivot_walk", "power_candidates", "preserved_state",
    "scale_lr", "search_max_batch", "suggest", "throughput", "unbiased_norms", "warmup_factor",
    "BatchRange", "Split", "budget_in_examples", "pow2_floor", "powers_of_two", "plan_rungs", "successive_halving",
    "Objective", "SeedStats",
]
