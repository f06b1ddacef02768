"""Scale-out adapters: ``torchrun`` data-parallel training and a Ray Tune trial backend.

``from batchlab.distributed import fit_ddp, maybe_run_distributed`` (torch.distributed only);
the Ray backend lives in :mod:`batchlab.distributed.ray_backend` and imports Ray only when used.
"""

from batchlab.distributed.ddp import (
    DistEnv,
    DistributedDataParallel,
    add_distributed_args,
    dist_env,
    fit_ddp,
    maybe_run_distributed,
    shard_bounds,
    sync_batchnorm,
)

__all__ = ["DistEnv", "DistributedDataParallel", "add_distributed_args", "dist_env", "fit_ddp", "maybe_run_distributed", "shard_bounds", "sync_batchnorm"]
