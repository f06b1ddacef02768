"""Normalization layers, their functional core, a NumPy reference and tools.

``from batchlab.norm import BatchNorm2d, GroupNorm, precise_bn, fold_bn, create_norm``.
The layers extend torch's classes (``isinstance(BatchNorm2d(4), torch.nn.BatchNorm2d)``).
This package imports only torch (and NumPy in :mod:`batchlab.norm.reference`).
"""

from batchlab.norm import functional
from batchlab.norm.convert import convert_norm, freeze_bn, replace_modules, unfreeze_bn
from batchlab.norm.fold import bn_scale_shift, find_foldable_pairs, fold_bn
from batchlab.norm.ghost import ghost_batch_norm
from batchlab.norm.health import BNHealth, HealthThresholds, LayerHealth, bn_health, format_bn_health
from batchlab.norm.interop import from_caffe, from_darknet, split_darknet_bn, to_caffe, to_caffe_layer, to_darknet
from batchlab.norm.layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    CaffeBatchNorm,
    FrozenBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RenormSchedule,
    RMSNorm,
    batchnorm_dims,
    default_num_groups,
    is_batchnorm,
)
from batchlab.norm.norm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, GroupNormAct, LayerNormAct
from batchlab.norm.precise import precise_bn
from batchlab.norm.registry import NormEntry, NormSpec, create_norm, known_norms, register_norm
from batchlab.norm.sync import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm

__all__ = [
    "BNHealth",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "CaffeBatchNorm",
    "FrozenBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNorm",
    "GroupNormAct",
    "HealthThresholds",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerHealth",
    "LayerNorm",
    "LayerNormAct",
    "NormEntry",
    "NormSpec",
    "RMSNorm",
    "RenormSchedule",
    "SyncBatchNorm",
    "batchnorm_dims",
    "bn_health",
    "bn_scale_shift",
    "convert_norm",
    "convert_sync_batchnorm",
    "create_norm",
    "default_num_groups",
    "find_foldable_pairs",
    "fold_bn",
    "format_bn_health",
    "freeze_bn",
    "from_caffe",
    "from_darknet",
    "functional",
    "ghost_batch_norm",
    "is_batchnorm",
    "known_norms",
    "precise_bn",
    "register_norm",
    "replace_modules",
    "split_darknet_bn",
    "sync_batch_norm",
    "to_caffe",
    "to_caffe_layer",
    "to_darknet",
    "unfreeze_bn",
]
