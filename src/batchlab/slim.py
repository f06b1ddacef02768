"""Network Slimming: L1 on BatchNorm's gamma, a global threshold, structural channel removal.

Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming":
train with ``loss + lambda * sum |gamma|`` over every BN scale (lambda 1e-4 for VGG, 1e-5 for
ResNet/DenseNet), rank all channels of all BN layers together by ``|gamma|``, remove the
smallest fraction ``prune`` of them (a *global* percentile threshold, so layers lose different
numbers of channels), then fine-tune. On VGG-19/CIFAR-10 the paper removes 70% of the channels
(20.04M -> 2.30M parameters) with the error going from 6.34% to 6.20%.

The pieces, usable on any model with BN layers:

- :func:`sparsity_callback` (:class:`SparsityCallback`): a :class:`batchlab.train.Callback` that
  adds the L1 subgradient ``lambda * sign(gamma)`` to every BN weight's gradient before each
  optimizer step. For your own loop call :func:`add_l1_subgradient` after ``backward()``.
- :func:`select_channels`: the global threshold (pure: gammas in, masks out).
- :func:`slim`: removes the selected channels with Torch-Pruning's ``DependencyGraph``, which
  also trims the producer (the conv/linear whose output channels feed the BN) and every consumer
  (the next conv's input channels, a linear after a flatten, ...), so the network stays
  consistent. Returns a :class:`SlimResult`.
- :func:`slim_task`: the whole pipeline on a batchlab Task (sparsity training, prune, fine-tune,
  fold BN, measure parameters, FLOPs, CPU latency and accuracy before and after), with an
  unpruned baseline trained for the same total number of epochs.

Numerical note: removing a channel whose gamma is small is not exact. Its BN output is
``beta`` plus a small term, and after the activation the next layer still received the constant
``act(beta)``; Network Slimming ignores it and lets fine-tuning absorb it. Only a channel with
``gamma == 0`` and ``act(beta) == 0`` (e.g. ``beta <= 0`` with ReLU) is truly dead and its
removal leaves the outputs unchanged.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from batchlab.norm import fold_bn, is_batchnorm
from batchlab.tasks import Task
from batchlab.train.config import TrainConfig
from batchlab.train.loop import Callback, StepContext, evaluate, fit

__all__ = [
    "ModelStats",
    "SlimResult",
    "SlimTaskResult",
    "SparsityCallback",
    "add_l1_subgradient",
    "bn_layers",
    "count_macs",
    "count_params",
    "gamma_values",
    "measure_latency",
    "select_channels",
    "slim",
    "slim_task",
    "sparsity_callback",
]


# ---------------------------------------------------------------------------------------------
# BN layers and the L1 subgradient


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every batch-norm layer with a learnable scale (gamma), in model order.

    Covers torch's ``BatchNorm*d`` and every subclass (batchlab's BatchNorm, BatchRenorm, GhostBatchNorm ...).
    """
    return [(n, m) for n, m in model.named_modules() if is_batchnorm(m) and getattr(m, "weight", None) is not None]


def gamma_values(model: nn.Module) -> dict[str, list[float]]:
    """``|gamma|`` of every BN layer, by layer name (plain lists, for JSON and histograms)."""
    return {n: m.weight.detach().abs().flatten().tolist() for n, m in bn_layers(model)}


@torch.no_grad()
def add_l1_subgradient(model: nn.Module, lam: float) -> None:
    """Add ``lam * sign(gamma)`` to the gradient of every BN scale of ``model`` (in place).

    This is the subgradient of ``lam * sum |gamma|`` (0 at gamma == 0). Call it after
    ``loss.backward()`` and before ``optimizer.step()``. Scales with ``requires_grad=False`` are
    left alone (an optimizer with weight decay would otherwise move a frozen layer).
    """
    for _, m in bn_layers(model):
        w = m.weight
        if not w.requires_grad:  # a frozen gamma stays where it is
            continue
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        w.grad.add_(torch.sign(w), alpha=lam)


class SparsityCallback(Callback):
    """:func:`batchlab.train.fit` callback adding the L1 subgradient on every BN gamma.

    Args:
        lam: the L1 weight lambda (>= 0; 0 disables it). The paper uses 1e-4 for VGG, 1e-5 for
            ResNet/DenseNet.

    The current ``sum |gamma|`` is logged as ``l1_gamma`` in the history rows.
    """

    def __init__(self, lam: float) -> None:
        _check_lambda(lam)
        self.lam = float(lam)

    def on_train_begin(self, ctx: StepContext) -> None:
        if not bn_layers(ctx.model):
            raise ValueError(f"sparsity training needs BN layers with a learnable scale; {type(ctx.model).__name__} has none")

    def on_before_step(self, ctx: StepContext) -> None:
        if self.lam > 0:
            add_l1_subgradient(ctx.model, self.lam)

    def on_evaluate(self, ctx: StepContext, row: dict[str, Any]) -> None:
        row["l1_gamma"] = float(sum(m.weight.detach().abs().sum() for _, m in bn_layers(ctx.model)))


def sparsity_callback(lam: float) -> SparsityCallback:
    """A :class:`SparsityCallback` with weight ``lam`` (``fit(task, cfg, callbacks=[sparsity_callback(1e-4)])``)."""
    return SparsityCallback(lam)


def _check_lambda(lam: Any) -> None:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"sparsity (the L1 weight lambda) must be a finite number >= 0, got {lam!r}")


def _check_ratio(prune: Any) -> None:
    if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0 < prune < 1:
        raise ValueError(f"prune must be a fraction of channels strictly between 0 and 1, got {prune!r}")


# ---------------------------------------------------------------------------------------------
# The global threshold


def select_channels(
    gammas: Sequence[Tensor], prune: float, names: Sequence[str] | None = None,
    units: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> tuple[list[Tensor], float, list[str]]:
    """Which channels to remove: the ``round(prune * total)`` smallest ``|gamma|`` over all layers.

    Ties at the threshold are broken by position (a stable sort), so exactly that many channels
    are chosen even when many gammas are equal. A layer that would lose every channel keeps the
    one with the largest ``|gamma|`` (a layer with no channels cannot pass a signal); each such
    case adds a note and the total removed is then smaller than asked.

    With ``units``, channels that can only go together (a residual sum's channel in every BN summed
    there) are ranked as one: by their largest ``|gamma|`` (a channel is small only if it is small
    in every BN it is coupled to), and taken whole, in that order, while they fit the count. Without
    that, a zero-initialized residual BN's channels ranked first and used up the budget, and its
    coupled BNs, which did not select them, kept them all: nothing was removed.

    Args:
        gammas: one 1-D tensor of scales per BN layer.
        prune: fraction of all channels to remove, in (0, 1).
        names: layer names for the notes (default: "layer <index>").
        units: groups of ``(layer index, channel)`` removed together; channels in none are units of
            their own. None: every channel on its own.

    Returns:
        ``(masks, threshold, notes)``: one boolean mask per layer (True = remove), the largest
        ``|gamma|`` removed (the threshold; NaN when nothing is removed) and the notes.
    """
    _check_ratio(prune)
    if not gammas:
        raise ValueError("select_channels needs at least one BN layer's gammas, got none")
    absg = [g.detach().abs().flatten().double().cpu() for g in gammas]
    total = sum(g.numel() for g in absg)
    k = int(round(prune * total))
    covered = {m for u in (units or ()) for m in u}
    groups = [list(u) for u in (units or ()) if u] + [[(i, c)] for i, g in enumerate(absg)
                                                      for c in range(g.numel()) if (i, c) not in covered]
    groups.sort(key=lambda u: min(u))  # position order: the stable tie-break
    scores = torch.tensor([max(float(absg[i][c]) for i, c in u) for u in groups], dtype=torch.float64)
    remove = [torch.zeros(g.numel(), dtype=torch.bool) for g in absg]
    taken, threshold = 0, math.nan
    for j in torch.sort(scores, stable=True).indices.tolist():
        if taken >= k:
            break
        if taken + len(groups[j]) > k:
            continue  # a unit larger than what is left of the count; a smaller one may still fit
        for i, c in groups[j]:
            remove[i][c] = True
        taken += len(groups[j])
        threshold = float(scores[j])
    masks, notes = [], []
    for i, (g, m) in enumerate(zip(absg, remove)):
        n = g.numel()
        if n and bool(m.all()):
            keep = int(torch.argmax(g))
            unit = next((u for u in groups if (i, keep) in u), [(i, keep)])
            for li, c in unit:  # the kept channel stays in every layer it is coupled to
                remove[li][c] = False
            notes.append(f"{names[i] if names else f'layer {i}'} would lose all {n} channels at prune={prune:g}; kept 1 (the largest |gamma|)")
        masks.append(m)
    return masks, threshold, notes


# ---------------------------------------------------------------------------------------------
# Structural pruning with Torch-Pruning


@dataclass
class SlimResult:
    """What :func:`slim` did.

    Attributes:
        model: the pruned model (a new object unless ``inplace``).
        prune: the requested fraction.
        threshold: the largest ``|gamma|`` selected for removal.
        channels_before, channels_after: BN channels per layer name.
        removed_fraction: channels removed / channels before, over all BN layers.
        notes: layers that kept one channel (keep-one rule), coupled channels left in place.
    """

    model: nn.Module
    prune: float
    threshold: float
    channels_before: dict[str, int]
    channels_after: dict[str, int]
    removed_fraction: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the model, JSON-able."""
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        return d


def _check_prunable(model: nn.Module) -> None:
    """Refuse, naming the layers, a model with parametrized weights (weight_norm, spectral_norm,
    torch.nn.utils.parametrize, or the deprecated hook versions): Torch-Pruning cuts the stored
    parameters, not what a parametrization computes from them, and fails on them."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found = [name or type(model).__name__ for name, m in model.named_modules()
             if parametrize.is_parametrized(m)
             or any(isinstance(h, (WeightNorm, SpectralNorm)) for h in m._forward_pre_hooks.values())]
    if found:
        raise ValueError(
            f"network slimming cannot prune layers with a parametrized weight (weight_norm, spectral_norm); "
            f"{type(model).__name__} has {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}: remove the "
            "parametrization first (torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight'), or "
            "torch.nn.utils.remove_weight_norm / remove_spectral_norm for the deprecated versions)")


def slim(
    model: nn.Module,
    example_inputs: Any,
    prune: float = 0.5,
    *,
    inplace: bool = False,
    ignored_layers: Sequence[nn.Module] = (),
) -> SlimResult:
    """Remove the ``prune`` fraction of BN channels with the smallest ``|gamma|`` (global threshold).

    Each BN layer's selected channels are removed together with their Torch-Pruning dependency
    group: the output channels of the conv/linear that feeds the BN, the BN's own parameters and
    running statistics, and the input channels of every layer that consumes them. Channels coupled
    across BN layers (e.g. two BNs summed in a residual block) are removed only when every coupled
    BN selected them.

    Args:
        model: a network with BN layers (trained with :func:`sparsity_callback` for best results).
        example_inputs: an input batch for tracing (e.g. ``x[:2]``).
        prune: fraction of all BN channels to remove, strictly between 0 and 1.
        inplace: prune ``model`` itself instead of a deep copy.
        ignored_layers: modules Torch-Pruning must not prune (e.g. a final BN whose channels are
            the model's outputs).

    Returns:
        A :class:`SlimResult`; its ``model`` gives outputs of the same shape.

    Raises:
        ValueError: ``prune`` outside (0, 1); the model has no BN layer with a learnable scale;
            a layer's weight is parametrized (weight_norm, spectral_norm); the model changed its output shape (a BN on the output must go in ``ignored_layers``).
    """
    import torch_pruning as tp

    _check_ratio(prune)
    if not bn_layers(model):
        raise ValueError(
            f"model has no BatchNorm layer with a learnable scale (gamma); network slimming ranks channels by "
            f"BN gamma, so {type(model).__name__} cannot be slimmed"
        )
    _check_prunable(model)
    net = model if inplace else copy.deepcopy(model)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        out_shape = _shape(net(*_as_tuple(example_inputs)))
    layers = [(n, m) for n, m in bn_layers(net) if m not in set(ignored_layers)]
    before = {n: int(m.num_features) for n, m in bn_layers(net)}
    dg = tp.DependencyGraph().build_dependency(
        net, example_inputs=example_inputs, ignored_layers=list(ignored_layers), verbose=False,
    )
    masks, threshold, notes = select_channels([m.weight for _, m in layers], prune, [n for n, _ in layers],
                                              units=_coupled_units(dg, layers))
    pending = {m: mask for (_, m), mask in zip(layers, masks)}  # BN module -> remove-mask, kept current
    name_of = {m: n for n, m in layers}

    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}  # Torch-Pruning makes new Parameters
    for _, bn in layers:
        mask = pending[bn]
        idxs = torch.nonzero(mask).flatten().tolist()
        if not idxs:
            continue
        handler = dg.get_pruner_of_module(bn).prune_out_channels
        group = dg.get_pruning_group(bn, handler, idxs=idxs)
        # Coupled BN layers in the same group (residual sums): keep a channel unless all agree.
        coupled: list[str] = []
        selected = sorted(idxs)
        for dep, tidxs in _group_items(group):
            other = dep.target.module
            if other is bn or other not in pending or not _is_out_fn(dg, dep.handler):
                continue
            if sorted(tidxs) != selected:  # against this BN's own selection, not the list narrowed so far
                notes.append(f"{name_of[bn]} is coupled to {name_of[other]} through a non-identity index mapping; "
                             f"its channels were left in place")
                idxs = []
                break
            idxs = [i for i in idxs if bool(pending[other][i])]
            coupled.append(name_of[other])
        if len(idxs) != len(torch.nonzero(mask)) and coupled:
            notes.append(f"{name_of[bn]}: {int(mask.sum()) - len(idxs)} of its {int(mask.sum())} selected channel(s) kept "
                         f"because a coupled BN layer ({', '.join(dict.fromkeys(coupled))}) needs them")
        if not idxs:
            continue
        group = dg.get_pruning_group(bn, handler, idxs=idxs)
        if not dg.check_pruning_group(group):
            notes.append(f"{name_of[bn]}: Torch-Pruning refused to prune {len(idxs)} channel(s) (would empty a layer)")
            continue
        touched = [(dep.target.module, list(t)) for dep, t in _group_items(group)
                   if dep.target.module in pending and _is_out_fn(dg, dep.handler)]
        group.prune()
        for mod, t in touched:  # drop the removed positions from each touched BN's mask
            keep = torch.ones(pending[mod].numel(), dtype=torch.bool)
            keep[t] = False
            pending[mod] = pending[mod][keep]
    for n, p in net.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    net.train(was_training)
    with torch.no_grad():
        was = net.training
        net.eval()
        new_shape = _shape(net(*_as_tuple(example_inputs)))
        net.train(was)
    if new_shape != out_shape:
        raise ValueError(f"pruning changed the model's output shape from {out_shape} to {new_shape}; pass the BN layer "
                         f"on the output in ignored_layers")
    after = {n: int(m.num_features) for n, m in bn_layers(net)}
    total = sum(before.values())
    removed = (total - sum(after.values())) / total if total else 0.0
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return SlimResult(net, float(prune), threshold, before, after, removed, notes)


def _coupled_units(dg: Any, layers: Sequence[tuple[str, nn.Module]]) -> list[list[tuple[int, int]]]:
    """Channels of different BN layers that Torch-Pruning's dependency graph couples one to one
    (a residual sum: channel c of every BN summed there), as units for :func:`select_channels`."""
    index = {m: i for i, (_, m) in enumerate(layers)}
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(x: tuple[int, int]) -> tuple[int, int]:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for i, (_, bn) in enumerate(layers):
        n = int(bn.num_features)
        handler = dg.get_pruner_of_module(bn).prune_out_channels
        group = dg.get_pruning_group(bn, handler, idxs=list(range(n)))
        for dep, tidxs in _group_items(group):
            j = index.get(dep.target.module)
            if j is None or j == i or not _is_out_fn(dg, dep.handler) or len(tidxs) != n:
                continue
            for c, t in zip(range(n), tidxs):
                a, b = find((i, c)), find((j, t))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    units: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for x in parent:
        units.setdefault(find(x), []).append(x)
    return [sorted(set(u) | {root}) for root, u in units.items()]


def _group_items(group: Any) -> list[tuple[Any, list[int]]]:
    items = []
    for item in group:
        dep, idxs = (item.dep, item.idxs) if hasattr(item, "dep") else item
        items.append((dep, [int(i) for i in idxs]))
    return items


def _is_out_fn(dg: Any, fn: Callable[..., Any]) -> bool:
    return bool(dg.is_out_channel_pruning_fn(fn))


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _shape(out: Any) -> Any:
    if isinstance(out, Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(_shape(o) for o in out)
    return None


# ---------------------------------------------------------------------------------------------
# Measurements: parameters, multiply-accumulates, latency


def count_params(model: nn.Module) -> int:
    """Number of parameters (BN's gamma and beta included; buffers not)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass over ``example_inputs``, per example, counted with
    forward hooks on Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear (the layers that dominate; BN, activations and
    pooling are a few operations per element and not counted). FLOPs ~ 2 x MACs.
    """
    total = 0

    def conv_hook(m: nn.Module, inp: Any, out: Tensor) -> None:
        nonlocal total
        k = math.prod(m.kernel_size) * (m.in_channels // m.groups)
        total += out.numel() * k

    def linear_hook(m: nn.Module, inp: Any, out: Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    def transposed_hook(m: nn.Module, inp: Any, out: Tensor) -> None:
        nonlocal total  # every input element is scattered to kernel x out_channels / groups outputs
        total += inp[0].numel() * math.prod(m.kernel_size) * (m.out_channels // m.groups)

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            handles.append(m.register_forward_hook(transposed_hook))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was = model.training
    model.eval()
    try:
        args = _as_tuple(example_inputs)
        model(*args)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    batch = args[0].shape[0] if isinstance(args[0], Tensor) and args[0].dim() else 1
    return total // max(1, batch)


@torch.no_grad()
def measure_latency(model: nn.Module, x: Tensor, *, repeats: int = 30, warmup: int = 5, threads: int | None = 1) -> float:
    """Median wall time in milliseconds of ``model(x)`` in eval mode on the current device.

    ``threads`` pins torch's intra-op thread count during the measurement (restored after; None
    keeps it). One thread is the default because small models gain nothing from more, and on a
    shared machine several threads waiting on each other turn other processes' load into
    latency spikes of 100x.
    """
    was = model.training
    old_threads = torch.get_num_threads()
    model.eval()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was)
        torch.set_num_threads(old_threads)
    return 1000.0 * statistics.median(times)


@dataclass
class ModelStats:
    """Size, cost and quality of one model."""

    params: int
    macs: int  # per example; FLOPs ~ 2 x MACs
    latency_ms_b1: float  # median CPU latency, batch 1, one intra-op thread
    latency_ms_b64: float  # median CPU latency, batch 64, one intra-op thread
    val_acc: float
    bn_channels: int

    @property
    def flops(self) -> int:
        return 2 * self.macs


def model_inputs(task: Task, n: int, *, split: str = "train") -> Tensor:
    """Up to ``n`` model inputs of ``task`` (the first element of its batches), on the CPU.

    Slimming, latency and MAC counting feed the model one tensor: a CNN's images.
    """
    try:
        size = len(task.val_source if split == "val" else task.train_source)
    except TypeError:
        size = n
    x = task.inputs_of(task.sample_batch(min(n, size), split=split))
    if not isinstance(x, Tensor):
        raise ValueError(f"task {task.name!r}: network slimming needs a model that takes one tensor (a CNN); its "
                         f"batches give {type(x).__name__} inputs")
    return x


def model_stats(model: nn.Module, task: Task, *, repeats: int = 30) -> ModelStats:
    """Parameters, MACs, CPU latency (batch 1 and 64) and validation metric of ``model`` on ``task``."""
    model = model.cpu()
    x = model_inputs(task, 64, split="val")
    x64 = x[:64] if x.shape[0] >= 64 else x.repeat((64 + x.shape[0] - 1) // x.shape[0], *([1] * (x.dim() - 1)))[:64]
    _, acc = evaluate(model, task.val_source, task, device="cpu")
    return ModelStats(
        params=count_params(model), macs=count_macs(model, x[:1]),
        latency_ms_b1=measure_latency(model, x[:1], repeats=repeats),
        latency_ms_b64=measure_latency(model, x64, repeats=repeats),
        val_acc=acc, bn_channels=sum(int(m.num_features) for _, m in bn_layers(model)),
    )


# ---------------------------------------------------------------------------------------------
# The whole pipeline on a Task


@dataclass
class SlimTaskResult:
    """The measured outcome of :func:`slim_task` (plain data; ``models`` is not serialized).

    ``before`` is the sparsity-trained model, ``after`` the pruned, fine-tuned and BN-folded one,
    ``baseline`` the unpruned model trained without the L1 term for epochs + finetune_epochs; with
    ``fold`` all three are measured folded, so their parameters, MACs and latency differ by pruning
    alone. ``val_acc`` is the task's metric (``metric``, ``higher_is_better``), accuracy or not.
    """

    task: str
    seed: int
    sparsity: float
    prune: float
    epochs: float
    finetune_epochs: float
    before: dict[str, Any]
    after: dict[str, Any]
    baseline: dict[str, Any] | None
    pruned_acc_before_finetune: float
    slim: dict[str, Any]
    gammas_baseline: list[float] | None
    gammas_sparse: list[float]
    fold_max_diff: float | None
    fold_note: str
    history_sparse: list[dict[str, Any]]
    history_finetune: list[dict[str, Any]]
    wall_time: float
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    metric: str = "accuracy"  # what val_acc holds: the task's metric (a loss, an IoU ...)
    higher_is_better: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "models"} | {"models": sorted(self.models)}


def slim_task(
    task: Task,
    *,
    sparsity: float = 1e-4,
    prune: float = 0.5,
    epochs: float | None = None,
    finetune_epochs: float | None = None,
    seed: int = 0,
    config: TrainConfig | None = None,
    baseline: bool = True,
    fold: bool = True,
    latency_repeats: int = 30,
) -> SlimTaskResult:
    """Network Slimming on a batchlab Task: sparsity training, global prune, fine-tune, BN fold.

    Args:
        task: the task; its model must have BN layers.
        sparsity: L1 weight lambda on the BN gammas.
        prune: fraction of all BN channels to remove, in (0, 1).
        epochs: sparsity-training epochs (default: the task's).
        finetune_epochs: fine-tuning epochs after pruning (default: half of ``epochs``).
        seed: training seed (model initialization, shared by the baseline, and batch order).
        config: base TrainConfig (batch size, LR, ...); its budget is replaced.
        baseline: also train the unpruned model without the L1 term for ``epochs + finetune_epochs``
            (the fair comparison) and record its gammas for the histogram.
        fold: fold the BN layers of the final model into the preceding conv/linear.
        latency_repeats: repeats per latency measurement (the median is reported).

    Returns:
        A :class:`SlimTaskResult` (models in ``.models``: "sparse", "slim" and "baseline").
    """
    _check_lambda(sparsity)
    _check_ratio(prune)
    t0 = time.perf_counter()
    epochs = float(task.epochs if epochs is None else epochs)
    finetune_epochs = float(epochs / 2 if finetune_epochs is None else finetune_epochs)
    if not epochs > 0:
        raise ValueError(f"epochs must be positive, got {epochs!r}")
    if finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be >= 0, got {finetune_epochs!r}")
    base = (config or TrainConfig(batch_size=task.batch_size, eval_train=False)).replace(
        seed=seed, device="cpu", epochs=epochs, max_steps=None, max_examples=None)
    with torch.random.fork_rng():  # the same seeded initialization for the sparse net and the baseline
        torch.manual_seed(seed)
        model = task.make_model(norm=base.norm, activation=base.activation)
    if not bn_layers(model):
        raise ValueError(f"task {task.name!r} builds a model without BatchNorm layers (norm={base.norm or task.norm!r}); "
                         f"network slimming needs BN gammas")
    _check_prunable(model)  # before any training
    models: dict[str, nn.Module] = {}

    base_res = None
    if baseline:
        bmodel = copy.deepcopy(model)
        r = fit(task, base.replace(epochs=epochs + finetune_epochs), model=bmodel)
        _check_run(r, "baseline training")
        models["baseline"] = bmodel
        base_res = asdict(_stats(bmodel, task, latency_repeats, fold))

    r_sparse = fit(task, base, model=model, callbacks=[SparsityCallback(sparsity)])
    _check_run(r_sparse, "sparsity training")
    models["sparse"] = model
    before = _stats(model, task, latency_repeats, fold)  # folded like the final model: the comparison is pruning
    example = model_inputs(task, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes are kept in the result
        res = slim(model, example, prune)
    pruned = res.model
    _, acc_pruned = evaluate(pruned, task.val_source, task, device="cpu")
    history_ft: list[dict[str, Any]] = []
    if finetune_epochs > 0:
        r_ft = fit(task, base.replace(epochs=finetune_epochs, seed=seed + 10_000), model=pruned)
        _check_run(r_ft, "fine-tuning")
        history_ft = r_ft.history
    final, fold_diff, fold_note = pruned.eval(), None, "not folded"
    if fold:
        final, fold_diff, fold_note = _fold(pruned, task)
    models["slim"] = final
    after = model_stats(final, task, repeats=latency_repeats)
    after.bn_channels = sum(res.channels_after.values())  # channels kept (their BN may be folded away)
    pull = sparsity * base_lr(task, base) * r_sparse.steps
    if 0 < pull < 0.05:
        res.notes.append(f"weak L1 pull: lambda x lr x steps = {pull:.2g} moves a gamma by at most that much; the "
                         f"gammas barely sparsify in {r_sparse.steps} steps (raise --sparsity or train longer)")
    return SlimTaskResult(
        task=task.name, seed=seed, sparsity=float(sparsity), prune=float(prune), epochs=epochs,
        finetune_epochs=finetune_epochs, before=asdict(before), after=asdict(after), baseline=base_res,
        pruned_acc_before_finetune=acc_pruned, slim=res.summary(),
        gammas_baseline=sum(gamma_values(models["baseline"]).values(), []) if baseline else None,
        gammas_sparse=sum(gamma_values(model).values(), []), fold_max_diff=fold_diff, fold_note=fold_note,
        history_sparse=r_sparse.history, history_finetune=history_ft, wall_time=time.perf_counter() - t0,
        models=models, metric=task.metric_name, higher_is_better=task.higher_is_better,
    )


def _stats(model: nn.Module, task: Task, repeats: int, fold: bool) -> ModelStats:
    """:func:`model_stats` of ``model`` as the final model is measured: BN folded when ``fold`` (the BN
    channels counted before folding), so parameters, MACs and latency differ by pruning alone."""
    if not fold:
        return model_stats(model, task, repeats=repeats)
    channels = sum(int(m.num_features) for _, m in bn_layers(model))
    stats = model_stats(_fold(copy.deepcopy(model), task)[0], task, repeats=repeats)
    stats.bn_channels = channels
    return stats


def base_lr(task: Task, config: TrainConfig) -> float:
    """The learning rate ``fit`` will use: the config's or the task's default."""
    return float(config.lr if config.lr is not None else task.lr)


def _check_run(r: Any, what: str) -> None:
    if not r.ok:
        raise RuntimeError(f"{what} ended with status {r.status!r}: {r.error}")


@torch.no_grad()
def _fold(model: nn.Module, task: Task) -> tuple[nn.Module, float, str]:
    """Fold BN into the preceding layers; check the eval outputs agree on the validation set."""
    model = model.eval()
    x = model_inputs(task, 256, split="val")
    folded = fold_bn(model, example_input=x)
    diff = float((task.logits_of(folded(x)) - task.logits_of(model(x))).abs().max())
    left = len(bn_layers(folded))
    note = f"folded {len(bn_layers(model)) - left} BN layer(s); {left} left" if left else "all BN layers folded"
    return folded, diff, note
