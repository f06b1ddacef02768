"""``bn_health``: a check-up of every batch norm in a model on one batch.

What is measured per layer (thresholds in :class:`HealthThresholds`):

* dead channels: ``|gamma| <= dead_gamma`` (1e-3). Such a channel outputs ``beta`` whatever its
  input (Network Slimming prunes them on purpose; unplanned they waste capacity). A layer whose
  gammas are all exactly 0 is taken as zero-initialized (a residual block's last BN), not dead, and
  so is one still near that early in training (every ``|gamma| <= 0.1``, and most at or below
  ``dead_gamma`` or every one within ``10 * dead_gamma``).
* collapsed running variance: ``running_var <= collapsed_var`` (1e-6). In eval the channel is
  divided by about ``sqrt(eps)``, which amplifies any deviation from the running mean.
* non-finite buffers/parameters: NaN or infinity in any of them (e.g. after an fp16 overflow).
* train-vs-eval gap: on this layer's input in the eval-mode forward, the normalized output
  with batch statistics versus with running statistics,
  ``rms(y_train - y_eval) / rms(y_train)``; above ``train_eval_gap`` (0.5) the running
  statistics do not describe the data (stale statistics, tiny batches, distribution shift).
  For the whole model: ``||f_train(x) - f_eval(x)|| / ||f_eval(x)||`` with batch norms in
  training mode and every other module in eval mode.
* saturated activations after BN, on the eval-mode output, by the activation that follows the
  layer (found by torch.fx tracing, else ``nn.Sequential`` adjacency; an activation module called at
  several places, such as torchvision's ``BasicBlock.relu``, counts):
  relu: ``y <= 0`` (no gradient; about half is normal, so flagged above ``relu_inactive`` 0.9);
  relu6: ``y <= 0 or y >= 6``; hardswish: ``y <= -3`` (zero output and gradient; flagged above
  ``relu_inactive`` too); hardsigmoid: ``|y| >= 3``; sigmoid: ``|y| > 4`` (derivative < 0.018);
  tanh: ``|y| > 2`` (derivative < 0.071); hardtanh: at or beyond its limits; anything else or unknown:
  ``|y| > 3`` (3 standard deviations; 0.27% for a unit normal). Flagged above ``saturated``
  (0.5).

The model is left exactly as found: modes, buffers and the RNG state are restored in ``finally``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from batchlab.norm._graph import activation_after, activation_name, direct_successors
from batchlab.norm.layers import CaffeBatchNorm, FrozenBatchNorm, is_batchnorm

__all__ = ["BNHealth", "LayerHealth", "HealthThresholds", "bn_health", "format_bn_health"]


@dataclasses.dataclass(frozen=True)
class HealthThresholds:
    """Limits used by :func:`bn_health`."""

    dead_gamma: float = 1e-3  # |gamma| at or below: dead channel
    collapsed_var: float = 1e-6  # running_var at or below: collapsed channel
    train_eval_gap: float = 0.5  # relative train-vs-eval output gap above: problem
    saturated: float = 0.5  # saturated fraction above: problem (non-ReLU activations)
    relu_inactive: float = 0.9  # inactive fraction above: problem (ReLU-like activations)
    unknown_abs: float = 3.0  # |y| above counts as saturated when the activation is unknown


@dataclasses.dataclass
class LayerHealth:
    """Findings for one normalization layer (plain data)."""

    name: str
    kind: str
    num_features: int
    dead_channels: list[int]
    collapsed_channels: list[int]
    nonfinite: list[str]
    train_eval_gap: float | None
    activation: str | None
    saturation_rule: str
    saturated_fraction: float | None
    problems: list[str]


@dataclasses.dataclass
class BNHealth:
    """Report of :func:`bn_health`; JSON-serializable with :meth:`to_json`."""

    layers: list[LayerHealth]
    output_gap: float | None
    graph_method: str
    thresholds: dict[str, float]
    batch_size: int

    @property
    def problems(self) -> list[str]:
        """Every problem, prefixed by its layer name."""
        return [f"{layer.name}: {p}" for layer in self.layers for p in layer.problems]

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (``ok`` and ``problems`` included)."""
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        d["problems"] = self.problems
        return d

    def to_json(self, **kw: Any) -> str:
        """Strict JSON (no NaN)."""
        return json.dumps(self.to_dict(), allow_nan=False, **kw)


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _saturation(y: Tensor, act: str | None, mod: nn.Module | None, th: HealthThresholds) -> tuple[str, Tensor]:
    if act == "relu":
        return "relu: y <= 0", y <= 0
    if act == "relu6":
        return "relu6: y <= 0 or y >= 6", (y <= 0) | (y >= 6)
    if act == "hardswish":
        return "hardswish: y <= -3", y <= -3
    if act == "hardsigmoid":
        return "hardsigmoid: |y| >= 3", y.abs() >= 3
    if act == "sigmoid":
        return "sigmoid: |y| > 4", y.abs() > 4
    if act == "tanh":
        return "tanh: |y| > 2", y.abs() > 2
    if act == "hardtanh":
        lo = float(getattr(mod, "min_val", -1.0))
        hi = float(getattr(mod, "max_val", 1.0))
        return f"hardtanh: y <= {lo} or y >= {hi}", (y <= lo) | (y >= hi)
    return f"{act or 'unknown'}: |y| > {th.unknown_abs}", y.abs() > th.unknown_abs


def _is_norm_layer(m: nn.Module) -> bool:
    return is_batchnorm(m) or isinstance(m, (FrozenBatchNorm, CaffeBatchNorm))


def _eval_stats(m: nn.Module) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    if isinstance(m, CaffeBatchNorm):
        mean, var = m.global_stats()
        return mean, var, None, None
    return getattr(m, "running_mean", None), getattr(m, "running_var", None), getattr(m, "weight", None), getattr(m, "bias", None)


@torch.no_grad()
def bn_health(model: nn.Module, batch: Any, thresholds: HealthThresholds | None = None, *,
              forward: Callable[[nn.Module, Any], Any] | None = None) -> BNHealth:
    """Check every batch-norm layer of ``model`` on one batch.

    Args:
        model: the network (left unchanged: modes, buffers, parameters and RNG state).
        batch: the model input, or a ``(x, y, ...)`` tuple/list whose first element is it; with
            ``forward``, any batch (already on the model's device).
        thresholds: limits (see :class:`HealthThresholds`).
        forward: ``forward(model, batch) -> output`` for models that do not take one tensor
            (a task's ``forward_batch``: dict batches, several inputs).

    Returns:
        A :class:`BNHealth` (see the module docstring for each measure).
    """
    th = thresholds or HealthThresholds()
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: hooks see the eager module's layers
    if forward is None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            raise TypeError(f"batch must be a tensor or an (x, y) tuple/list, got {type(batch).__name__}; for other "
                            "batches give forward=lambda model, batch: model(**batch) or similar")
        param = next(model.parameters(), None)
        if param is not None:
            x = x.to(param.device)

        def run() -> Any:
            return model(x)

        n_examples = int(x.shape[0]) if x.dim() else 1
    else:

        def run() -> Any:
            return _output_tensor(forward(model, batch))

        n_examples = _examples(batch)
    layers = {name: m for name, m in model.named_modules() if _is_norm_layer(m)}
    if not layers:
        warnings.warn(f"bn_health: {type(model).__name__} has no batch-norm layer, so there is nothing to check and the "
                      "report is empty", stacklevel=2)
    succ, method = direct_successors(model)
    modes = {m: m.training for m in model.modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, Tensor)}
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    try:
        with torch.random.fork_rng(devices=[]):
            for name, m in layers.items():

                def hook(mod: nn.Module, args: tuple[Any, ...], out: Any, _n: str = name) -> None:
                    if isinstance(out, Tensor):
                        captured[_n] = (args[0].detach(), out.detach())

                handles.append(m.register_forward_hook(hook))
            model.eval()
            out_eval = run()
            for h in handles:
                h.remove()
            handles.clear()
            output_gap: float | None = None
            try:
                for m in layers.values():
                    if is_batchnorm(m):
                        m.train()
                out_train = run()
                if isinstance(out_eval, Tensor) and isinstance(out_train, Tensor):
                    den = out_eval.double().norm().item()
                    output_gap = _finite_or_none((out_train.double() - out_eval.double()).norm().item() / max(den, 1e-12))
            except ValueError:
                output_gap = None  # e.g. one value per channel: no batch statistics possible
            _restore(model, state, modes)  # the train-mode pass moved the running statistics
        reports = []
        for name, m in layers.items():
            problems: list[str] = []
            mean, var, w, b = _eval_stats(m)
            c = int(getattr(m, "num_features", mean.numel() if mean is not None else 0))
            # every gamma exactly 0 is a deliberate zero init (the last BN of a residual block, as in
            # torchvision's zero_init_residual or timm's zero_init_last), not channels that died in
            # training; so is a layer still near it early in training (every |gamma| <= 0.1, and most
            # at or below dead_gamma or all within 10x of it), where a layer that lost channels keeps
            # its large gammas
            small = None if w is None else w.detach().abs() <= th.dead_gamma
            top = 0.0 if w is None else float(w.detach().abs().max())
            if w is None or bool((w.detach() == 0).all()) or (
                    top <= 0.1 and (float(small.float().mean()) >= 0.5 or top <= 10 * th.dead_gamma)):
                dead = []
            else:
                dead = torch.nonzero(small).flatten().tolist()
            collapsed = [] if var is None else torch.nonzero(var <= th.collapsed_var).flatten().tolist()
            nonfinite = [k.rpartition(".")[2] for k, v in state.items() if k.startswith(f"{name}.") and k.count(".") == name.count(".") + 1 and v.is_floating_point() and not torch.isfinite(v).all()]
            if name == "":
                nonfinite = [k for k, v in state.items() if "." not in k and v.is_floating_point() and not torch.isfinite(v).all()]
            act, act_mod = activation_after(model, succ, name)
            own_act = getattr(m, "act", None)  # a norm+activation layer (BatchNormAct): its own activation,
            if isinstance(own_act, nn.Module) and activation_name(own_act) is not None:  # judged on the norm's output
                act, act_mod = activation_name(own_act), own_act
            gap: float | None = None
            rule, frac = _saturation(torch.zeros(0), act, act_mod, th)[0], None
            if name in captured:
                xin, yout = captured[name]
                if act_mod is own_act and mean is not None and var is not None:  # before the activation
                    yout = F.batch_norm(xin.float(), mean.float(), var.float(), None if w is None else w.float(),
                                        None if b is None else b.float(), False, 0.0, float(getattr(m, "eps", 1e-5)))
                rule, sat = _saturation(yout.float(), act, act_mod, th)
                frac = _finite_or_none(sat.float().mean().item()) if sat.numel() else None
                n_per_channel = xin.numel() // max(xin.shape[1], 1) if xin.dim() >= 2 else 0
                if mean is not None and var is not None and n_per_channel > 1:
                    eps = float(getattr(m, "eps", 1e-5))
                    y_tr = F.batch_norm(xin.double(), None, None, None, None, True, 0.0, eps)
                    y_ev = F.batch_norm(xin.double(), mean.double(), var.double(), None, None, False, 0.0, eps)
                    if w is not None:
                        shape = (1, -1) + (1,) * (xin.dim() - 2)
                        y_tr, y_ev = y_tr * w.double().view(shape), y_ev * w.double().view(shape)
                    num = (y_tr - y_ev).square().mean().sqrt().item()
                    den = y_tr.square().mean().sqrt().item()
                    gap = _finite_or_none(num / max(den, 1e-12)) if math.isfinite(num) else None
            if dead:
                problems.append(f"{len(dead)} dead channel(s) with |gamma| <= {th.dead_gamma}: {dead[:10]}")
            if collapsed:
                problems.append(f"{len(collapsed)} channel(s) with running_var <= {th.collapsed_var}: {collapsed[:10]}")
            if nonfinite:
                problems.append(f"non-finite values in {', '.join(nonfinite)}")
            if gap is not None and gap > th.train_eval_gap:
                problems.append(f"train-vs-eval gap {gap:.3g} > {th.train_eval_gap}")
            limit = th.relu_inactive if act in ("relu", "relu6", "hardswish") else th.saturated
            if frac is not None and frac > limit:
                problems.append(f"{frac:.1%} saturated after BN ({rule}) > {limit:.0%}")
            reports.append(
                LayerHealth(
                    name=name or "(model)",
                    kind=type(m).__name__,
                    num_features=c,
                    dead_channels=[int(i) for i in dead],
                    collapsed_channels=[int(i) for i in collapsed],
                    nonfinite=nonfinite,
                    train_eval_gap=gap,
                    activation=act,
                    saturation_rule=rule,
                    saturated_fraction=frac,
                    problems=problems,
                )
            )
        return BNHealth(
            layers=reports,
            output_gap=output_gap,
            graph_method=method,
            thresholds={k: float(v) for k, v in dataclasses.asdict(th).items()},
            batch_size=n_examples,
        )
    finally:
        for h in handles:
            h.remove()
        _restore(model, state, modes)


def _output_tensor(out: Any) -> Any:
    """The tensor of a model output (itself, ``.logits``, ``["logits"]`` or a tuple's first), for the output gap."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    return logits if isinstance(logits, Tensor) else out


def _examples(batch: Any) -> int:
    """The first dimension of the first tensor in a (nested) batch."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        n = _examples(v)
        if n:
            return n
    return 0


def _restore(model: nn.Module, state: dict[str, Tensor], modes: dict[nn.Module, bool]) -> None:
    live = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, v in state.items():
            if k in live:
                live[k].data.copy_(v)
    for mod, mode in modes.items():
        mod.training = mode


def format_bn_health(report: BNHealth) -> str:
    """A plain-text table of a :class:`BNHealth` report for the command line.

    Args:
        report: the output of :func:`bn_health`.

    Returns:
        The table, then one line per problem (or "no problems found").
    """

    def f(v: float | None, fmt: str = ".3f") -> str:
        return "-" if v is None else format(v, fmt)

    head = ("layer", "kind", "C", "dead", "collapsed", "nonfinite", "gap", "act", "saturated")
    rows = [head]
    for lh in report.layers:
        rows.append(
            (
                lh.name,
                lh.kind,
                str(lh.num_features),
                str(len(lh.dead_channels)),
                str(len(lh.collapsed_channels)),
                ",".join(lh.nonfinite) or "-",
                f(lh.train_eval_gap),
                lh.activation or "?",
                f(lh.saturated_fraction, ".1%"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"model train-vs-eval output gap: {f(report.output_gap)}  (batch size {report.batch_size}, graph: {report.graph_method})")
    problems = report.problems
    unmeasured = bool(report.layers) and all(lh.train_eval_gap is None for lh in report.layers)
    if unmeasured:
        lines.append(f"train-vs-eval gap NOT MEASURED (batch size {report.batch_size}: the batch norms could not "
                     "normalize with its statistics); give a larger batch to check the running statistics")
    lines.extend([f"PROBLEM {p}" for p in problems] if problems else
                 ["no problems found" + (" among the checks that ran" if unmeasured else "")])
    return "\n".join(lines)
