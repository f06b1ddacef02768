"""Models that take ``norm=`` and ``activation=``: MLP, small CNNs, CIFAR ResNets, a sequence net."""

from batchlab.models.cnn import CNN1d, CNN2d
from batchlab.models.common import ACTIVATIONS, count_parameters, make_activation
from batchlab.models.mlp import MLP
from batchlab.models.resnet import BasicBlock, ResNet, resnet8, resnet20
from batchlab.models.sequence import SequenceNet

__all__ = [
    "ACTIVATIONS",
    "BasicBlock",
    "CNN1d",
    "CNN2d",
    "MLP",
    "ResNet",
    "SequenceNet",
    "count_parameters",
    "make_activation",
    "resnet8",
    "resnet20",
]
