"""A CIFAR-style ResNet on a map-style Dataset of uint8 images, written as outside code.

The model is the ResNet of kuangliu/pytorch-cifar (``models/resnet.py``): BasicBlock, option-B
(1x1 conv + BatchNorm) shortcuts, four stages, ``ResNet18()``. Two changes, both opt-in or
harmless at CIFAR's size: a ``width`` argument (64 in the original) so CPU tests can use a thin
network, and adaptive average pooling instead of ``F.avg_pool2d(out, 4)`` so images smaller than
32x32 work (identical for 32x32 inputs).

The data is a CIFAR-10 look-alike generated from a seed: ``data`` is an (N, H, W, 3) uint8 array
and ``targets`` a list of ints, as in ``torchvision.datasets.CIFAR10``; the transforms are the usual
``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(...)``,
written here because torchvision is not installed (they take numpy HWC uint8 images, not PIL).
``write_cifar10_pickles`` writes the same kind of data in the CIFAR-10 python format and
``CIFAR10Folder`` reads it back, as ``torchvision.datasets.CIFAR10(root, train=...)`` would.

Only ``make_task`` knows about batchlab, and imports it lazily.
"""

from __future__ import annotations

import functools
import os
import pickle
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------------------------
# Model (kuangliu/pytorch-cifar, models/resnet.py)
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10, width=64):
        super().__init__()
        self.in_planes = width

        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], stride=2)
        self.linear = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_planes, planes, stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = F.adaptive_avg_pool2d(out, 1)  # the original: F.avg_pool2d(out, 4), 32x32 only
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def ResNet18(num_classes=10):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def ResNet8(num_classes=10, width=8):
    """One BasicBlock per stage (conv1 + 4 x 2 convs + linear); thin by default, for CPU tests."""
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, width=width)


# ---------------------------------------------------------------------------------------------
# Transforms (torchvision.transforms look-alikes on numpy HWC uint8 images / CHW tensors)
# ---------------------------------------------------------------------------------------------


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self):
        inner = "".join(f"\n    {t}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


class RandomCrop:
    """Zero-pad by ``padding`` on every side, then crop a random ``size`` x ``size`` window.

    Takes an (H, W, C) numpy array or a (C, H, W) tensor. Draws from torch's global generator, as
    torchvision does, so DataLoader workers (seeded per worker) give reproducible crops.
    """

    def __init__(self, size, padding=None, fill=0):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.padding = padding or 0
        self.fill = fill

    def __call__(self, img):
        th, tw = self.size
        p = self.padding
        if isinstance(img, torch.Tensor):  # (C, H, W)
            if p:
                img = F.pad(img, (p, p, p, p), value=self.fill)
            h, w = img.shape[-2:]
        else:  # (H, W, C)
            if p:
                img = np.pad(img, ((p, p), (p, p), (0, 0)), mode="constant", constant_values=self.fill)
            h, w = img.shape[:2]
        if h < th or w < tw:
            raise ValueError(f"RandomCrop: crop size {(th, tw)} is larger than the padded image {(h, w)}")
        i = int(torch.randint(0, h - th + 1, size=(1,)))
        j = int(torch.randint(0, w - tw + 1, size=(1,)))
        if isinstance(img, torch.Tensor):
            return img[..., i : i + th, j : j + tw]
        return img[i : i + th, j : j + tw]

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        if torch.rand(1).item() < self.p:
            if isinstance(img, torch.Tensor):
                return img.flip(-1)
            return img[:, ::-1]
        return img

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p})"


class ToTensor:
    """(H, W, C) uint8 in [0, 255] -> (C, H, W) float32 in [0, 1]."""

    def __call__(self, pic):
        if isinstance(pic, torch.Tensor):
            return pic.float().div(255) if pic.dtype == torch.uint8 else pic.float()
        arr = np.ascontiguousarray(pic)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(arr.transpose(2, 0, 1).copy())
        return t.float().div(255) if arr.dtype == np.uint8 else t.float()

    def __repr__(self):
        return f"{type(self).__name__}()"


class Normalize:
    def __init__(self, mean, std):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, tensor):
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return (tensor - mean) / std

    def __repr__(self):
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def cifar_transforms(size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)):
    """(train, test) transforms as in kuangliu/pytorch-cifar's main.py."""
    transform_train = Compose([
        RandomCrop(size, padding=4),
        RandomHorizontalFlip(),
        ToTensor(),
        Normalize(mean, std),
    ])
    transform_test = Compose([
        ToTensor(),
        Normalize(mean, std),
    ])
    return transform_train, transform_test


# ---------------------------------------------------------------------------------------------
# Data: a CIFAR-10 look-alike, generated from a seed
# ---------------------------------------------------------------------------------------------

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Per class: an object colour (RGB) and a stripe orientation (0 horizontal, 1 vertical). Five
# colours x two orientations: colour alone gets a model to about 50%, the rest needs the texture.
# Both cues survive random crops and horizontal flips.
_COLOURS = np.array(
    [[220, 40, 40], [40, 200, 60], [50, 80, 230], [230, 210, 40], [200, 60, 210]], dtype=np.float32
)


def make_images(n, size=32, seed=0, num_classes=10, noise=24.0):
    """``(images, labels)``: (n, size, size, 3) uint8 and (n,) int64, deterministic in ``seed``.

    Each image: a random dull background with a gradient, and a striped rectangle of random
    position and extent (at least half the side) whose colour and stripe orientation are set by
    the class (colours jittered per image), plus Gaussian pixel noise.
    """
    if num_classes > 2 * len(_COLOURS):
        raise ValueError(f"at most {2 * len(_COLOURS)} classes")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")

    bg = rng.uniform(40, 140, size=(n, 1, 1, 3)).astype(np.float32)
    slope = rng.uniform(-1.5, 1.5, size=(n, 1, 1, 2)).astype(np.float32)
    img = bg + slope[..., :1] * yy[None, :, :, None] + slope[..., 1:] * xx[None, :, :, None]
    img = np.broadcast_to(img, (n, size, size, 3)).copy()

    side = rng.integers(size // 2, size + 1, size=(n, 2))           # rectangle height, width
    top = rng.integers(0, size - side[:, 0] + 1)
    left = rng.integers(0, size - side[:, 1] + 1)
    inside = (
        (yy[None] >= top[:, None, None]) & (yy[None] < (top + side[:, 0])[:, None, None])
        & (xx[None] >= left[:, None, None]) & (xx[None] < (left + side[:, 1])[:, None, None])
    )
    period = rng.integers(3, 6, size=n).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
    vertical = (labels % 2).astype(bool)
    coord = np.where(vertical[:, None, None], xx[None], yy[None])
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * coord / period[:, None, None] + phase[:, None, None])

    colour = _COLOURS[labels // 2] + rng.normal(0, 20, size=(n, 3)).astype(np.float32)
    obj = colour[:, None, None, :] * (0.35 + 0.65 * stripes[..., None])
    img = np.where(inside[..., None], obj, img)
    img += rng.normal(0, noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8), labels.astype(np.int64)


class SyntheticCIFAR(Dataset):
    """CIFAR-10-like data set: ``data`` (N, H, W, 3) uint8, ``targets`` list of ints.

    ``train=True`` and ``train=False`` draw from different streams of the same ``seed``.
    """

    classes = CLASSES

    def __init__(self, n=512, train=True, size=32, seed=0, transform=None, target_transform=None):
        self.train = train
        self.transform = transform
        self.target_transform = target_transform
        data, targets = make_images(n, size=size, seed=(seed, 0 if train else 1))
        self.data = data
        self.targets = targets.tolist()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        img, target = self.data[index], self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def channel_stats(data):
    """Per-channel mean and std of (N, H, W, 3) uint8 images, in [0, 1] units."""
    x = data.reshape(-1, data.shape[-1]).astype(np.float64) / 255.0
    return tuple(x.mean(axis=0).tolist()), tuple(x.std(axis=0).tolist())


# ---------------------------------------------------------------------------------------------
# The CIFAR-10 python format on disk (cifar-10-batches-py)
# ---------------------------------------------------------------------------------------------

_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILES = ["test_batch"]


def write_cifar10_pickles(root, n_train=500, n_test=100, seed=0):
    """Write generated 32x32 images as ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.

    The layout of the real files: per batch a dict with ``b'data'`` (N, 3072) uint8 (the red
    plane, then green, then blue, each row-major) and ``b'labels'`` (list of N ints); the keys are
    bytes, as the real (Python 2) files give them with ``pickle.load(f, encoding="bytes")``.
    Returns the folder.
    """
    folder = os.path.join(os.fspath(root), "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for files, n, split in ((_TRAIN_FILES, n_train, 0), (_TEST_FILES, n_test, 1)):
        data, labels = make_images(n, size=32, seed=(seed, split))
        flat = data.transpose(0, 3, 1, 2).reshape(n, -1)
        for k, name in enumerate(files):
            part = slice(k * n // len(files), (k + 1) * n // len(files))
            batch = {
                b"batch_label": name.encode(),
                b"labels": labels[part].tolist(),
                b"data": np.ascontiguousarray(flat[part]),
                b"filenames": [f"synthetic_{i}.png".encode() for i in range(part.start, part.stop)],
            }
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump(batch, f, protocol=2)
    meta = {"label_names": list(CLASSES), "num_cases_per_batch": n_train // 5, "num_vis": 3072}
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


class CIFAR10Folder(Dataset):
    """Reads ``cifar-10-batches-py`` like ``torchvision.datasets.CIFAR10(root, train, transform)``."""

    def __init__(self, root, train=True, transform=None, target_transform=None):
        self.transform = transform
        self.target_transform = target_transform
        folder = os.path.join(os.fspath(root), "cifar-10-batches-py")
        if not os.path.isdir(folder):
            folder = os.fspath(root)
        data, targets = [], []
        for name in _TRAIN_FILES if train else _TEST_FILES:
            with open(os.path.join(folder, name), "rb") as f:
                entry = pickle.load(f, encoding="bytes")
            entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
            data.append(entry["data"])
            targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # to HWC
        self.targets = targets

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        img, target = self.data[index], self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


# ---------------------------------------------------------------------------------------------
# batchlab entry point
# ---------------------------------------------------------------------------------------------


def make_datasets(n_train=512, n_val=256, size=32, seed=0):
    """(train, val): augmented training images, plain validation images, normalized with the
    training set's own per-channel statistics."""
    train = SyntheticCIFAR(n_train, train=True, size=size, seed=seed)
    val = SyntheticCIFAR(n_val, train=False, size=size, seed=seed)
    mean, std = channel_stats(train.data)
    train.transform, val.transform = cifar_transforms(size, mean, std)
    return train, val


def make_task(n_train=512, n_val=256, size=32, width=8, num_workers=2, seed=0, **kw: Any):
    """A batchlab Task: ResNet-8 (``width`` channels in the first stage) on generated CIFAR-like
    images with crop/flip augmentation, loaded by a DataLoader with ``num_workers`` workers.

    Further keyword arguments go to ``Task.from_torch`` and override the defaults below (for
    example ``epochs=1`` or ``lr=0.1``).
    """
    from batchlab import Task

    train, val = make_datasets(n_train, n_val, size, seed)
    args: dict[str, Any] = dict(
        name="cifar-resnet",
        model=functools.partial(ResNet8, num_classes=10, width=width),
        train=train,
        val=val,
        metric="accuracy",
        num_workers=num_workers,
        optimizer="momentum",
        lr=0.05,
        batch_size=64,
        epochs=2,
    )
    args.update(kw)
    return Task.from_torch(**args)
