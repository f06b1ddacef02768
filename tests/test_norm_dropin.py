"""batchlab's norm layers as drop-ins for torch's: subclassing, the four bugs of issue 12 (each
written from torch's behaviour), argument checks, and third-party tools (Torch-Pruning, torch's
fusion) on batchlab layers."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import batchlab.norm as N
from batchlab.norm import functional as BF

from tests.helpers.norm import assert_close

# ----------------------------------------------------------------------------- subclassing


@pytest.mark.parametrize(
    "make,base",
    [
        (lambda: N.BatchNorm1d(3), nn.BatchNorm1d),
        (lambda: N.BatchNorm2d(3), nn.BatchNorm2d),
        (lambda: N.BatchNorm3d(3), nn.BatchNorm3d),
        (lambda: N.BatchRenorm2d(3), nn.BatchNorm2d),
        (lambda: N.GhostBatchNorm1d(3), nn.BatchNorm1d),
        (lambda: N.GhostBatchNorm3d(3), nn.BatchNorm3d),
        (lambda: N.BatchNormAct2d(3), nn.BatchNorm2d),
        (lambda: N.SyncBatchNorm(3), nn.SyncBatchNorm),
        (lambda: N.GroupNorm(4, 2), nn.GroupNorm),
        (lambda: N.GroupNormAct(4, 2), nn.GroupNorm),
        (lambda: N.LayerNorm(4), nn.LayerNorm),
        (lambda: N.RMSNorm(4), nn.RMSNorm),
        (lambda: N.InstanceNorm2d(3), nn.InstanceNorm2d),
    ],
)
def test_layers_are_torch_classes(make, base: type) -> None:  # type: ignore[no-untyped-def]
    m = make()
    assert isinstance(m, base), f"{type(m).__name__} is not a {base.__name__}"


def test_frozen_and_caffe_are_not_batchnorms() -> None:
    # their state is not a trainable BatchNorm's: tools that train, prune or sync BN must skip them
    assert not N.is_batchnorm(N.FrozenBatchNorm(3)) and not N.is_batchnorm(N.CaffeBatchNorm(3))
    assert N.is_batchnorm(N.GhostBatchNorm2d(3)) and N.is_batchnorm(N.SyncBatchNorm(3))


@pytest.mark.parametrize("cls,ref", [(N.BatchNorm2d, nn.BatchNorm2d), (N.InstanceNorm2d, nn.InstanceNorm2d), (N.GroupNorm, None)])
def test_bias_keyword_as_torch(cls: type, ref: type | None) -> None:
    ours = cls(4, 2, bias=False) if cls is N.GroupNorm else cls(4, affine=True, bias=False)
    theirs = nn.GroupNorm(2, 4, bias=False) if ref is None else ref(4, affine=True, bias=False)
    assert ours.bias is None and ours.weight is not None
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())


# ----------------------------------------------------------------------------- bug 1: num_batches_tracked


@pytest.mark.parametrize(
    "make",
    [lambda: N.BatchNorm2d(3, momentum=None), lambda: N.BatchRenorm2d(3, momentum=None), lambda: N.GhostBatchNorm2d(3, momentum=None, virtual_batch_size=64), lambda: N.SyncBatchNorm(3, momentum=None)],
    ids=["batch", "renorm", "ghost", "sync"],
)
def test_state_dict_without_num_batches_tracked_keeps_the_counter_as_torch(make) -> None:  # type: ignore[no-untyped-def]
    ours, ref = make(), nn.BatchNorm2d(3, momentum=None)
    x0 = torch.randn(8, 3, 2, 2) + 1
    for _ in range(7):
        ours(x0), ref(x0)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 7
    # a plain dict (no version metadata) without the counter, e.g. a hand-made or converted checkpoint
    src = nn.BatchNorm2d(3)
    with torch.no_grad():
        src.running_mean.fill_(2.0)
        src.running_var.fill_(3.0)
    sd = {k: v.clone() for k, v in src.state_dict().items() if k != "num_batches_tracked"}
    ours.load_state_dict(dict(sd))
    ref.load_state_dict(dict(sd))
    assert int(ref.num_batches_tracked) == 7, "torch keeps the module's counter"
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    # with momentum=None the next batch is averaged in with factor 1/8, not allowed to overwrite
    x = torch.randn(16, 3, 2, 2) * 2
    ours.train()(x), ref.train()(x)
    assert_close(ours.running_mean, ref.running_mean, 1e-6, 1e-6, "running_mean after the load")
    assert ours.running_mean.sub(2.0).abs().max() < 0.5, "the loaded statistics were overwritten"


def test_old_versioned_checkpoint_without_counter_keeps_it_as_torch() -> None:
    ours, ref = N.BatchNorm1d(3), nn.BatchNorm1d(3)
    ours.num_batches_tracked.fill_(5)
    ref.num_batches_tracked.fill_(5)
    sd = nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    ours.load_state_dict(sd)
    ref.load_state_dict(sd)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 5


# ----------------------------------------------------------------------------- bug 2: empty batch (subprocess)

_EMPTY = """
import json, torch, torch.nn as nn, batchlab.norm as N
torch.manual_seed(0)
out = {}
cases = {
    "torch_bn": lambda: nn.BatchNorm2d(3),
    "renorm2d": lambda: N.BatchRenorm2d(3, warmup_steps=0, rmax_steps=0, dmax_steps=0),
    "renorm1d": lambda: N.BatchRenorm1d(3),
    "caffe": lambda: N.CaffeBatchNorm(3),
    "ghost": lambda: N.GhostBatchNorm2d(3, virtual_batch_size=2),
}
for name, make in cases.items():
    layer = make()
    shape = (6, 3) if name == "renorm1d" else (6, 3, 2, 2)
    layer(torch.randn(shape) * 2 + 1)  # non-trivial statistics first
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn((0,) + shape[1:], requires_grad=True)
    y = layer(x)
    y.sum().backward()
    after = layer.state_dict()
    out[name] = {
        "shape": list(y.shape),
        "finite": all(bool(torch.isfinite(v.float()).all()) for v in after.values()),
        "changed": sorted(k for k in after if not torch.equal(after[k], before[k])),
        "grad_shape": list(x.grad.shape),
    }
print(json.dumps(out))
"""


def test_empty_training_batch_in_a_subprocess_as_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", _EMPTY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the process died (code {proc.returncode}): {proc.stderr[-2000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    torch_bn = res["torch_bn"]
    assert torch_bn["changed"] == ["num_batches_tracked"], torch_bn  # torch counts the step, keeps the statistics
    for name in ("renorm2d", "renorm1d", "caffe", "ghost"):
        r = res[name]
        assert r["finite"], f"{name}: non-finite state after an empty batch"
        assert r["shape"][0] == 0 and r["grad_shape"][0] == 0, r
    assert res["renorm2d"]["changed"] == res["renorm1d"]["changed"] == torch_bn["changed"]
    assert res["caffe"]["changed"] == [], "Caffe accumulates nothing from no data"
    assert res["ghost"]["changed"] == [], "no virtual batch was seen"


# ----------------------------------------------------------------------------- bug 3: renorm, tracking switched off


def test_renorm_with_tracking_switched_off_freezes_buffers_as_torch() -> None:
    torch.manual_seed(0)
    kw = dict(warmup_steps=0, rmax_steps=0, dmax_steps=0, rmax=1.5, dmax=0.5)
    rn, twin, ref = N.BatchRenorm2d(3, **kw), N.BatchRenorm2d(3, **kw), nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4) * 3 + 2
    for m in (rn, twin, ref):
        m(x)
    for m in (rn, ref):
        m.track_running_stats = False
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    x2 = torch.randn(8, 3, 4, 4) * 0.5 - 1
    y, y_twin = rn(x2), twin(x2)
    ref(x2)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ref_before[k]), f"torch's reference moved {k}"
    for k, v in rn.state_dict().items():
        assert torch.equal(v, before[k]), f"BatchRenorm moved {k} with track_running_stats=False"
    # r and d still come from the (frozen) running statistics: same output as the tracking twin
    assert_close(y, y_twin, 1e-6, 1e-6, "renorm output with frozen statistics")
    assert not torch.equal(twin.running_mean, rn.running_mean), "the twin must have moved (test sanity)"


# ----------------------------------------------------------------------------- bug 4: Ghost BN second derivatives


def _penalty(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    y = layer(x)
    (g,) = torch.autograd.grad((y * gy).sum(), x, create_graph=True)
    (g.square().sum() + (y * g).sum()).backward()
    return (x.grad, *(p.grad for p in layer.parameters()))


class _Loop(nn.Module):
    """The reference: torch's BatchNorm over each virtual batch."""

    def __init__(self, bn: nn.Module, vbs: int) -> None:
        super().__init__()
        self.bn, self.vbs = bn, vbs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.bn(c) for c in x.split(self.vbs)])


@pytest.mark.parametrize(
    "impl,shape,vbs",
    [("fused", (24, 5), 8), ("fused", (22, 5), 8), ("native", (16, 3, 2, 3), 4), ("native", (20, 5), 8), ("vectorized", (24, 5), 8), ("vectorized", (16, 3, 2, 3), 4)],
)
def test_ghost_second_derivatives_match_a_loop_of_torch_batchnorm(impl: str, shape: tuple[int, ...], vbs: int) -> None:
    from batchlab.norm import _kernels

    if impl == "fused" and not _kernels.available():
        pytest.skip(f"fused kernel unavailable: {_kernels.unavailable_reason()}")
    cls = N.GhostBatchNorm1d if len(shape) == 2 else N.GhostBatchNorm2d
    ghost = cls(shape[1], virtual_batch_size=vbs, impl=impl).double()
    ref = _Loop((nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(shape[1]).double(), vbs)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-1, 1)
    ref.bn.load_state_dict(ghost.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    got, want = _penalty(ghost, x, gy), _penalty(ref, x, gy)
    for what, a, b in zip(("input", "weight", "bias"), got, want):
        assert_close(a, b, 1e-9, 1e-9, f"ghost {impl} {shape} second-order {what} gradient")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda: N.BatchNorm2d(3, eps=float("nan")), r"eps must be a finite number >= 0, got nan"),
        (lambda: N.BatchNorm2d(3, eps=-1e-5), r"eps must be a finite number >= 0, got -1e-05"),
        (lambda: N.GhostBatchNorm2d(3, eps=float("inf")), r"eps must be a finite number >= 0, got inf"),
        (lambda: N.BatchRenorm2d(3, eps="small"), r"eps must be a finite number >= 0, got 'small'"),
        (lambda: N.SyncBatchNorm(3, eps=float("nan")), r"eps must be a finite number >= 0, got nan"),
        (lambda: N.LayerNorm(4, eps=float("nan")), r"eps must be a finite number >= 0, got nan"),
        (lambda: N.GroupNorm(4, 2, eps=-1.0), r"eps must be a finite number >= 0, got -1.0"),
        (lambda: N.RMSNorm(4, eps=float("nan")), r"eps must be a finite number >= 0 or None, got nan"),
        (lambda: N.InstanceNorm2d(3, eps=float("nan")), r"eps must be a finite number >= 0, got nan"),
        (lambda: N.FrozenBatchNorm(3, eps=float("nan")), r"eps must be a finite number >= 0, got nan"),
        (lambda: N.CaffeBatchNorm(3, eps=float("nan")), r"eps must be a finite number >= 0, got nan"),
        (lambda: N.BatchNorm1d(3, momentum=1.5), r"momentum must be in \[0, 1\] or None \(cumulative average\), got 1.5"),
        (lambda: N.GhostBatchNorm1d(3, momentum=float("nan")), r"momentum must be in \[0, 1\] or None \(cumulative average\), got nan"),
        (lambda: N.SyncBatchNorm(3, momentum=-0.1), r"momentum must be in \[0, 1\] or None \(cumulative average\), got -0.1"),
        (lambda: N.InstanceNorm1d(3, momentum=2), r"momentum must be in \[0, 1\] or None \(cumulative average\), got 2"),
        (lambda: N.BatchNorm2d(0), r"num_features must be a positive int, got 0"),
        (lambda: N.BatchNorm2d(3.0), r"num_features must be a positive int, got 3.0"),
        (lambda: N.GroupNorm(6, 4), r"num_groups must be a positive divisor of num_channels \(6\), got 4"),
        (lambda: N.GroupNorm(6, 0), r"num_groups must be a positive divisor of num_channels \(6\), got 0"),
        (lambda: N.GroupNormAct(6, 5), r"num_groups must be a positive divisor of num_channels \(6\), got 5"),
        (lambda: N.LayerNorm((4, 0)), r"normalized_shape must be a positive int or a tuple of them, got \(4, 0\)"),
        (lambda: N.RMSNorm([]), r"normalized_shape must be a positive int or a tuple of them, got \[\]"),
        (lambda: N.LayerNorm("4"), r"normalized_shape must be a positive int or a tuple of them, got '4'"),
        (lambda: N.GhostBatchNorm2d(3, virtual_batch_size=0), r"virtual_batch_size must be a positive int, got 0"),
        (lambda: N.GhostBatchNorm2d(3, virtual_batch_size=2.5), r"virtual_batch_size must be a positive int, got 2.5"),
        (lambda: N.BatchRenorm2d(3, rmax=0.5), r"rmax must be a finite number >= 1, got 0.5"),
        (lambda: N.BatchRenorm2d(3, rmax=float("nan")), r"rmax must be a finite number >= 1, got nan"),
        (lambda: N.BatchRenorm2d(3, dmax=-1.0), r"dmax must be a finite number >= 0, got -1.0"),
        (lambda: N.BatchRenorm2d(3, dmax=float("inf")), r"dmax must be a finite number >= 0, got inf"),
        (lambda: N.BatchRenorm2d(3, warmup_steps=-1), r"warmup_steps must be an int >= 0, got -1"),
        (lambda: N.CaffeBatchNorm(3, moving_average_fraction=float("nan")), r"moving_average_fraction must be in \[0, 1\], got nan"),
        (lambda: N.BatchNormAct2d(3, act_layer="relu7"), r"act_layer must be one of .*relu.* or a module class, got 'relu7'"),
        (lambda: N.FrozenBatchNorm(3, dims=4), r"dims must be one of \[1, 2, 3\], got 4"),
    ],
)
def test_constructor_arguments_checked_with_name_allowed_and_given(make, pattern: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=pattern):
        make()


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda: N.BatchNorm2d(3, affine="yes"), r"affine must be True or False, got 'yes'"),
        (lambda: N.BatchNorm2d(3, track_running_stats=1), r"track_running_stats must be True or False, got 1"),
        (lambda: N.LayerNorm(3, elementwise_affine=None), r"elementwise_affine must be True or False, got None"),
        (lambda: N.GroupNorm(4, 2, bias="no"), r"bias must be True or False, got 'no'"),
    ],
)
def test_flag_arguments_checked(make, pattern: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=pattern):
        make()


def test_torch_itself_accepts_nan_eps_silently() -> None:
    # why the checks exist: torch builds the layer and returns NaN at the first forward
    y = nn.BatchNorm1d(3, eps=float("nan"))(torch.randn(4, 3))
    assert torch.isnan(y).all()


# ----------------------------------------------------------------------------- third-party tools


def _cnn(bn: type) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), bn(8), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), bn(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )


def test_torch_pruning_bn_scale_importance_prunes_batchlab_bn_exactly_as_torch_bn() -> None:
    tp = pytest.importorskip("torch_pruning")
    nets = {}
    for name, bn in (("torch", nn.BatchNorm2d), ("batchlab", N.BatchNorm2d)):
        net = _cnn(bn)
        with torch.no_grad():  # distinct gammas, so the ranking is well defined
            for i, m in enumerate(m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
                m.weight.copy_(torch.linspace(-1.0, 2.0, m.num_features).roll(3 * i + 1))
        nets[name] = net
    nets["batchlab"].load_state_dict(nets["torch"].state_dict())
    x = torch.randn(2, 3, 8, 8)
    kept = {}
    for name, net in nets.items():
        imp = tp.importance.BNScaleImportance()
        pruner = tp.pruner.MetaPruner(net, x, importance=imp, pruning_ratio=0.5, ignored_layers=[net[8]])
        pruner.step()
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        kept[name] = [m.weight.detach().clone() for m in bns]
        assert [m.num_features for m in bns] == [4, 6], f"{name}: {[m.num_features for m in bns]}"
    for a, b in zip(kept["torch"], kept["batchlab"]):
        assert torch.equal(a, b), "batchlab's BatchNorms must be pruned exactly like torch's"
    nets["torch"].eval(), nets["batchlab"].eval()
    assert torch.equal(nets["torch"](x), nets["batchlab"](x))


def test_torch_fusion_utilities_fold_batchlab_bn() -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = _cnn(N.BatchNorm2d)
    net(torch.randn(8, 3, 8, 8))
    net.eval()
    fused = fuse_conv_bn_eval(net[0], net[1])
    x = torch.randn(2, 3, 8, 8)
    assert_close(fused(x), net[1](net[0](x)), 1e-5, 1e-5, "torch's fuse_conv_bn_eval on a batchlab BatchNorm2d")


# ----------------------------------------------------------------------------- new layers


@pytest.mark.parametrize("shape,eps,affine", [((4, 7), None, True), ((2, 3, 5), 1e-3, False), ((2, 3, 4, 5), 0.1, True)])
def test_rmsnorm_matches_torch(shape: tuple[int, ...], eps: float | None, affine: bool) -> None:
    norm_shape = shape[-2:] if len(shape) == 4 else shape[-1]
    ours, ref = N.RMSNorm(norm_shape, eps=eps, elementwise_affine=affine), nn.RMSNorm(norm_shape, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert torch.equal(ya, yb)
    ya.sum().backward(), yb.sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_frozen_bn_eps_policy_and_unfreeze_round_trip() -> None:
    bn = N.BatchNorm2d(3, eps=1e-3)
    bn(torch.randn(8, 3, 2, 2) * 2 + 1)
    bn.eval()
    x = torch.randn(4, 3, 2, 2)
    kept = N.FrozenBatchNorm.from_batchnorm(bn)
    assert kept.eps == 1e-3 and kept.dims == 2, "default: the source layer's eps"
    assert_close(kept(x), bn(x), 1e-6, 1e-6, "frozen keeps eval outputs")
    zero = N.FrozenBatchNorm.from_batchnorm(bn, eps=0.0)
    manual = (x - bn.running_mean.view(1, 3, 1, 1)) / bn.running_var.sqrt().view(1, 3, 1, 1)
    assert_close(zero(x), manual * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1), 1e-5, 1e-5, "eps=0 override")
    back = kept.eval().unfreeze()
    assert type(back) is N.BatchNorm2d and back.eps == 1e-3 and not back.training
    assert [n for n, _ in back.named_parameters()] == ["weight", "bias"], "trainable again"
    for k, v in back.state_dict().items():
        assert torch.equal(v, bn.state_dict()[k]), k
    model = nn.Sequential(nn.Conv1d(2, 3, 1), N.BatchNorm1d(3))
    model(torch.randn(4, 2, 5))
    N.freeze_bn(model, eps=1e-2)
    assert isinstance(model[1], N.FrozenBatchNorm) and model[1].eps == 1e-2
    N.unfreeze_bn(model)
    assert type(model[1]) is N.BatchNorm1d and model[1].eps == 1e-2 and model[1].weight.requires_grad


def test_unfreeze_gives_back_affine_false_and_frozen_parameters() -> None:
    # freeze then unfreeze is the identity on what the layer was: no affine appears, and a
    # weight the user froze (requires_grad=False) stays frozen
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, affine=False), nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4))
    model[0](torch.randn(8, 5))
    model[3].weight.requires_grad_(False)
    N.freeze_bn(model)
    assert "affine=False" in repr(model[1]) and "affine=False" not in repr(model[3])
    x = torch.randn(3, 6)
    frozen_out = model[1](x)
    N.unfreeze_bn(model)
    assert not model[1].affine and model[1].weight is None and model[1].bias is None
    assert [n for n, _ in model[1].named_parameters()] == []
    assert_close(model[1].eval()(x), frozen_out, 1e-6, 1e-6, "same statistics after the round trip")
    assert model[3].affine and not model[3].weight.requires_grad and model[3].bias.requires_grad


@pytest.mark.parametrize("act", ["relu", "gelu", nn.SiLU, "identity"])
def test_norm_act_layers_equal_norm_then_activation(act) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    act_mod = N.norm_act.make_activation(act, inplace=False)
    x = torch.randn(6, 4, 3, 3)
    for ours, norm in [
        (N.BatchNormAct2d(4, act_layer=act), nn.BatchNorm2d(4)),
        (N.GroupNormAct(4, 2, act_layer=act), nn.GroupNorm(2, 4)),
        (N.LayerNormAct((3, 3), act_layer=act), nn.LayerNorm((3, 3))),
    ]:
        with torch.no_grad():
            for p in norm.parameters():
                p.uniform_(0.5, 1.5)
        ours.load_state_dict(norm.state_dict())
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), act_mod(norm(xb))
        assert_close(ya, yb, 1e-6, 1e-6, f"{type(ours).__name__}({act})")
        ya.sum().backward(), yb.sum().backward()
        assert_close(xa.grad, xb.grad, 1e-5, 1e-5, f"{type(ours).__name__}({act}) input grad")


def test_norm_act_registered_and_folded_with_its_activation() -> None:
    for name, cls in (("batch_act", N.BatchNormAct2d), ("group_act", N.GroupNormAct), ("layer_act", N.GroupNormAct)):
        layer = N.create_norm(name, 8, act_layer="silu")
        assert type(layer) is cls and isinstance(layer.act, nn.SiLU)
    assert type(N.create_norm("layer_act", 8, dims=0)) is N.LayerNormAct
    assert type(N.create_norm("rms", 8, dims=0)) is N.RMSNorm
    with pytest.raises(ValueError, match=r"norm 'rms' normalizes the trailing .* \(dims=0.* layer \(dims=2\)"):
        N.create_norm("rms", 8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), N.BatchNormAct2d(4, act_layer="relu"))
    net(torch.randn(4, 3, 6, 6))
    net.eval()
    folded = N.fold_bn(net)
    assert isinstance(folded[1], nn.ReLU), f"the activation must survive folding, got {folded[1]}"
    x = torch.randn(2, 3, 6, 6)
    assert_close(folded(x), net(x), 1e-5, 1e-5, "folded conv + BatchNormAct")


# ----------------------------------------------------------------------------- conversion


def test_convert_sync_batchnorm_leaves_renorm_ghost_and_act_alone_unlike_torchs() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), N.BatchNorm2d(3, bias=False), N.BatchRenorm2d(3), N.GhostBatchNorm2d(3), N.BatchNormAct2d(3))
    torch_conv = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(N.BatchRenorm2d(3), N.GhostBatchNorm2d(3)))
    assert all(type(m) is nn.SyncBatchNorm for m in torch_conv), "torch's converter flattens them (why batchlab has its own)"
    out = N.convert_sync_batchnorm(model)
    assert [type(m) for m in out] == [N.SyncBatchNorm, N.SyncBatchNorm, N.BatchRenorm2d, N.GhostBatchNorm2d, N.BatchNormAct2d]
    assert out[1].bias is None
    assert type(N.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(2))) is N.SyncBatchNorm


def test_convert_norm_and_freeze_bn_leave_norm_act_layers_alone() -> None:
    # replacing a BatchNormAct2d by a GroupNorm or a FrozenBatchNorm would silently drop its activation
    model = nn.Sequential(nn.Conv2d(3, 4, 1), N.BatchNormAct2d(4), nn.Conv2d(4, 4, 1), N.BatchNorm2d(4))
    N.convert_norm(model, "group")
    assert type(model[1]) is N.BatchNormAct2d and type(model[3]) is N.GroupNorm
    model = nn.Sequential(nn.Conv2d(3, 4, 1), N.BatchNormAct2d(4), nn.Conv2d(4, 4, 1), N.BatchNorm2d(4))
    N.freeze_bn(model)
    assert type(model[1]) is N.BatchNormAct2d and type(model[3]) is N.FrozenBatchNorm


def test_registered_norm_converts_with_what_its_entry_inherits() -> None:
    made = []

    def factory(c: int, dims: int = 2, eps: float = 1e-5, momentum: float | None = 0.1) -> nn.Module:
        made.append((eps, momentum))
        return N.BatchNorm2d(c, eps=eps, momentum=momentum)

    N.register_norm("test-inherits", factory, inherits=("eps", "momentum"))
    N.convert_norm(nn.Sequential(nn.BatchNorm2d(3, eps=1e-3, momentum=None)), "test-inherits")
    assert made == [(1e-3, None)]
    assert N.registry.norm_entry("group").inherits == ("eps", "affine", "bias")
    with pytest.raises(ValueError, match=r"inherits must name settings from eps, momentum, affine, track_running_stats, bias, got \['colour'\]"):
        N.register_norm("test-bad-inherits", factory, inherits=("colour",))
    g = N.convert_norm(nn.Sequential(nn.BatchNorm2d(4, bias=False)), "group")[0]
    assert isinstance(g, N.GroupNorm) and g.bias is None, "bias=False carries over"


def test_no_import_circle_in_norm() -> None:
    import ast
    import pathlib

    root = pathlib.Path(N.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("batchlab"):
                        raise AssertionError(f"{path.name}: function {node.name} imports {inner.module} lazily (a hidden circle)")
    # a fresh interpreter can import each module on its own
    code = "import importlib,sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    mods = [f"batchlab.norm.{p.stem}" for p in root.glob("*.py") if p.stem != "__init__"]
    proc = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_batch_renorm_schedule_tensor_and_float_agree() -> None:
    s = N.RenormSchedule(rmax=3.0, dmax=5.0, warmup_steps=10, rmax_steps=50, dmax_steps=30)
    for step in (0, 9, 10, 11, 29, 30, 31, 49, 50, 1000):
        rf, df = s.limits(step)
        rt, dt = s.limits(torch.tensor(step))
        assert math.isclose(rf, float(rt), rel_tol=1e-12) and math.isclose(df, float(dt), rel_tol=1e-12), step
    c = N.RenormSchedule.constant(2.0, 1.0)
    assert tuple(float(v) for v in c.limits(torch.tensor(0))) == (2.0, 1.0)


def test_functional_batch_renorm_accepts_tensor_momentum() -> None:
    x = torch.randn(8, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm2, rv2 = torch.zeros(3), torch.ones(3)
    BF.batch_renorm(x, rm, rv, training=True, momentum=0.25)
    BF.batch_renorm(x, rm2, rv2, training=True, momentum=torch.tensor(0.25))
    assert torch.equal(rm, rm2) and torch.allclose(rv, rv2)


_SYNC_DDP = r"""
import faulthandler, gc, sys
faulthandler.dump_traceback_later(90, exit=True)  # a hang prints every thread's stack and fails
import pytest, torch, torch.nn as nn, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as TorchDDP
import batchlab.norm as N
from batchlab.distributed import DistributedDataParallel

assert issubclass(DistributedDataParallel, TorchDDP)
# refused before any distributed work: no process group exists yet
with pytest.raises(ValueError, match=r"torch's nn.SyncBatchNorm \(1\) only works with GPU modules.*convert_sync_batchnorm"):
    DistributedDataParallel(nn.Sequential(nn.Linear(3, 2), nn.SyncBatchNorm(2)))
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
try:
    converted = N.convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    assert isinstance(converted[1], N.SyncBatchNorm) and isinstance(converted[1], nn.SyncBatchNorm)
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        TorchDDP(converted)
    gc.collect()  # torch raised after building its reducer: free it while the group is alive
    model = DistributedDataParallel(converted)
    model(torch.randn(4, 3)).sum().backward()
    assert converted[0].weight.grad is not None and int(converted[1].num_batches_tracked) == 1
    del model
    gc.collect()
finally:
    dist.destroy_process_group()
print("ok", flush=True)
"""


def test_sync_batchnorm_is_torchs_class_and_batchlab_ddp_trains_it_on_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # batchlab's SyncBatchNorm is an nn.SyncBatchNorm; torch's DDP refuses every nn.SyncBatchNorm
    # in a CPU module (torch's forward only runs on accelerators), batchlab's DDP only torch's own.
    # If torch lifts its check, the first raises-block fails: then torch's DDP is enough.
    # A process group lives in its own interpreter, as in every other distributed test: one left
    # behind in pytest's process (or a gloo call that never returns) must not stall the suite.
    proc = subprocess.run([sys.executable, "-c", _SYNC_DDP, str(tmp_path / "rdv")],
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.stdout + proc.stderr)[-4000:]


def test_frozen_bn_loads_checkpoints_torchs_batchnorm_loads() -> None:
    # no counter in the checkpoint (a plain dict): kept, as torch's BN does
    src = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    src[1].running_mean.uniform_(-1, 1)
    plain = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    frozen = N.freeze_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    frozen[1].num_batches_tracked.fill_(7)
    assert not frozen.load_state_dict(plain).missing_keys
    assert torch.equal(frozen[1].running_mean, src[1].running_mean) and int(frozen[1].num_batches_tracked) == 7
    # affine=False both ways: no weight or bias in either state dict
    torch_plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False))
    frozen = N.freeze_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)))
    frozen.load_state_dict(torch_plain.state_dict())
    torch_plain.load_state_dict(frozen.state_dict())
    assert "1.weight" not in frozen.state_dict()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ghost_and_renorm_take_reduced_precision_on_cpu_as_torchs_bn(dtype) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3)
    # a few units in the last place of each format (bfloat16 keeps 8 bits of mantissa, half 11):
    # the two sides round in a different order
    tol = {"rtol": 0.02, "atol": 0.05 if dtype == torch.bfloat16 else 0.02}
    # a half / bfloat16 Ghost BN (native kernels) against torch's BN on each virtual batch
    ghost = N.GhostBatchNorm2d(4, 3, impl="native").to(dtype)
    ref = nn.BatchNorm2d(4).to(dtype)
    y = ghost(x.to(dtype))
    expected = torch.cat([ref(x[:3].to(dtype)), ref(x[3:].to(dtype))])
    torch.testing.assert_close(y.float(), expected.float(), **tol)
    torch.testing.assert_close(ghost.running_var.float(), ref.running_var.float(), **tol)
    y.float().sum().backward()
    # a float32 Batch Renorm fed reduced precision (autocast style), as torch's BN accepts it
    renorm, bn = N.BatchRenorm2d(4), nn.BatchNorm2d(4)  # r = 1, d = 0 at the start: a batch norm
    xr, xb = x.to(dtype).requires_grad_(), x.to(dtype).requires_grad_()
    out, out_ref = renorm(xr), bn(xb)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), out_ref.float(), **tol)
    out.float().square().sum().backward()
    out_ref.float().square().sum().backward()
    torch.testing.assert_close(xr.grad.float(), xb.grad.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_renorm_and_caffe_keep_float32_statistics_of_reduced_precision_input_as_torchs_bn(dtype) -> None:  # type: ignore[no-untyped-def]
    # a mean of 100 in bf16 is off by up to 0.25 when the statistics are rounded to the input's
    # format; torch's BN with float32 buffers keeps its float32 accumulators, and so must these
    torch.manual_seed(0)
    x = (torch.randn(16, 8, 6, 6) * 3 + 100.0).to(dtype)
    exact_mean = x.double().mean((0, 2, 3))
    bn, renorm, caffe = nn.BatchNorm2d(8), N.BatchRenorm2d(8), N.CaffeBatchNorm(8)
    out_ref, out = bn(x), renorm(x)
    caffe(x)
    torch.testing.assert_close(renorm.running_mean, bn.running_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(renorm.running_var, bn.running_var, rtol=1e-5, atol=1e-5)
    # no further from the exact result than torch's own output (both within the format's rounding)
    exact = F.batch_norm(x.double(), None, None, None, None, True, 0.0, 1e-5)
    assert (out.double() - exact).abs().max() <= (out_ref.double() - exact).abs().max() * 1.01
    torch.testing.assert_close(caffe.mean.double(), exact_mean, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vectorized_ghost_bn_returns_reduced_precision_as_native_does(dtype) -> None:  # type: ignore[no-untyped-def]
    # it returned float32 for bf16 input and rounded its statistics to the input's format
    torch.manual_seed(0)
    x = (torch.randn(8, 4, 5, 5) * 3 + 50).to(dtype)
    exact = torch.cat([F.batch_norm(x[i:i + 4].double(), None, None, training=True) for i in (0, 4)])
    native, vec = N.GhostBatchNorm2d(4, 4, impl="native"), N.GhostBatchNorm2d(4, 4, impl="vectorized")
    xn, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
    yn, yv = native(xn), vec(xv)
    assert yv.dtype == yn.dtype == dtype
    assert (yv.double() - exact).abs().max() <= (yn.double() - exact).abs().max() * 1.01
    torch.testing.assert_close(vec.running_mean, native.running_mean, rtol=0, atol=1e-4)
    yn.float().square().sum().backward()
    yv.float().square().sum().backward()
    assert xv.grad.dtype == dtype
    torch.testing.assert_close(xv.grad.float(), xn.grad.float(), rtol=0.02, atol=0.05)


def test_vectorized_ghost_bn_takes_non_contiguous_input_as_native_does() -> None:
    # a transposed or permuted batch raised "view size is not compatible"
    torch.manual_seed(0)
    for x0, make in [(torch.randn(5, 10).t(), lambda impl: N.GhostBatchNorm1d(5, 2, impl=impl)),
                     (torch.randn(4, 3, 6, 6).permute(0, 1, 3, 2), lambda impl: N.GhostBatchNorm2d(3, 2, impl=impl))]:
        got = []
        for impl in ("native", "vectorized"):
            x = x0.detach().requires_grad_()
            y = make(impl)(x)
            y.square().sum().backward()
            got.append((y.detach(), x.grad))
        torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-4, atol=1e-4)


def test_ghost_bn_traces_with_torch_jit_trace_in_eval() -> None:
    # eval read the batch size, which tracing turns into a tensor ("virtual_batch_size must be a
    # positive int, got tensor(6)")
    torch.manual_seed(0)
    for g in (N.GhostBatchNorm2d(4, 2), N.GhostBatchNorm2d(4, 2, track_running_stats=False)):
        g.train()(torch.randn(8, 4, 3, 3))
        g.eval()
        traced = torch.jit.trace(g, torch.randn(6, 4, 3, 3))
        x = torch.randn(6, 4, 3, 3)
        torch.testing.assert_close(traced(x), g(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["tracked-train", "channels-last-eval", "switched-off-train", "switched-off-eval"])
def test_instance_norm_buffers_and_layout_as_torchs(case: str) -> None:
    # torch moves buffers that exist whenever the input's statistics are used (tracking switched off
    # after construction too) and returns the contiguous layout in eval; batchlab left the buffers
    # alone there and returned channels_last
    torch.manual_seed(0)
    ref, ours = nn.InstanceNorm2d(3, affine=True, track_running_stats=True), N.InstanceNorm2d(3, affine=True, track_running_stats=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    if case.startswith("switched-off"):
        ref.track_running_stats = ours.track_running_stats = False
    if case.endswith("eval"):
        ref.eval()
        ours.eval()
    if case == "channels-last-eval":
        x = x.to(memory_format=torch.channels_last)
    want, got = ref(x), ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.stride() == want.stride()
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-6, atol=1e-7)


def test_instance_norm_takes_an_empty_batch_with_running_statistics() -> None:
    # batchlab raised "cannot reshape tensor of 0 elements"; torch raises for affine layers only
    for affine in (False, True):
        layer = N.InstanceNorm2d(3, affine=affine, track_running_stats=True)
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and torch.equal(layer.running_mean, torch.zeros(3))


def test_conversions_refuse_a_parametrized_weight_instead_of_dropping_it() -> None:
    # the weight of a parametrized BN lives in parametrizations.weight.original: the converted
    # layer kept its initial 1s and the eval output changed by up to 4.7 (torch's SyncBN converter raises)
    from torch.nn.utils import parametrize

    class Exp(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.exp()

    def model() -> nn.Module:
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        parametrize.register_parametrization(net[1], "weight", Exp())
        return net

    for convert in (lambda m: N.convert_norm(m, "ghost", virtual_batch_size=2), lambda m: N.convert_norm(m, "renorm"),
                    N.convert_sync_batchnorm):
        net = model()
        with pytest.raises(ValueError, match=r"cannot convert 1 \(ParametrizedBatchNorm2d\): its weight is parametrized"):
            convert(net)
        assert parametrize.is_parametrized(net[1]) and isinstance(net[1], nn.BatchNorm2d)  # nothing was converted


def test_renorm_and_caffe_second_derivatives_equal_torchs_batch_norm() -> None:
    torch.manual_seed(0)
    for layer in (N.BatchRenorm2d(3).double(), N.CaffeBatchNorm(3).double()):  # Renorm at r = 1, d = 0
        x = torch.randn(4, 3, 2, 2, dtype=torch.double, requires_grad=True)
        hess = []
        for f in (layer, lambda t: F.batch_norm(t, None, None, training=True, eps=layer.eps)):
            g, = torch.autograd.grad(f(x).pow(3).sum(), x, create_graph=True)
            hess.append(torch.autograd.grad(g.sum(), x)[0])
        torch.testing.assert_close(hess[0], hess[1], rtol=1e-10, atol=1e-10)


def test_freezing_a_batch_norm_without_bias_keeps_its_state_dict_keys() -> None:
    # freeze_bn gave BatchNorm2d(8, bias=False) a "bias" key (strict loads failed both ways) and
    # unfreeze a trainable bias it never had
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, bias=False))
    net[1].running_mean.uniform_()
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, bias=False))
    frozen = N.freeze_bn(copy.deepcopy(net))
    assert "1.bias" not in frozen.state_dict()
    ref.load_state_dict(frozen.state_dict())
    frozen.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(frozen.eval()(x), net.eval()(x), rtol=0, atol=0)
    back = N.unfreeze_bn(frozen)
    assert back[1].bias is None and back[1].weight is not None
    back.load_state_dict(net.state_dict())  # strict


def test_torch_func_grad_through_batch_renorm_equals_torchs_batch_norm() -> None:
    # torch.func needs autograd.Functions with a separate setup_context; at r = 1, d = 0 (the start
    # of the schedule) Batch Renorm is a batch norm, so the gradients are torch's
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    ours = nn.Sequential(nn.Conv2d(3, 4, 3), N.BatchRenorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 8, 8)

    def loss(params, buffers, model):  # type: ignore[no-untyped-def]
        return functional_call(model, (params, buffers), (x,)).square().sum()

    g = [grad(loss)(dict(m.named_parameters()), {k: v.clone() for k, v in m.named_buffers()}, m) for m in (ours, ref)]
    assert g[0].keys() == g[1].keys()
    for k in g[0]:
        torch.testing.assert_close(g[0][k], g[1][k], rtol=1e-5, atol=1e-5)


def test_convert_norm_refuses_what_would_change_the_model_silently() -> None:
    # Batch Renorm always keeps running statistics: a BN without them would change in eval mode
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"cannot convert 1 \(BatchNorm2d with track_running_stats=False.*to 'renorm'"):
        N.convert_norm(model, "renorm")
    N.convert_norm(model, "ghost")  # keeps batch statistics in eval mode, like the original
    assert model[1].track_running_stats is False
    # a BatchNorm1d on (N, C) turned into instance norm: refused at the first forward, not misread
    mlp = N.convert_norm(nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6)), "instance")
    with pytest.raises(ValueError, match=r"replaced a BatchNorm1d got a 2-D input: that is \(N, C\)"):
        mlp(torch.randn(6, 3))
    conv = N.convert_norm(nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), "instance")
    x = torch.randn(4, 3, 10)
    torch.testing.assert_close(conv(x), nn.functional.instance_norm(conv[0](x), eps=1e-5))
    assert torch.jit.script(conv)(x).shape == (4, 6, 8)


def test_convert_norm_swaps_a_transformers_layer_norms_for_rms_norms() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.fc, self.ln2 = nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln2(self.fc(self.ln1(x)))

    torch.manual_seed(0)
    block = Block()
    with torch.no_grad():
        block.ln1.weight.uniform_(0.5, 2.0)
    gamma = block.ln1.weight.detach().clone()
    x = torch.randn(2, 5, 8)
    is_ln = lambda m: isinstance(m, nn.LayerNorm)  # noqa: E731
    N.convert_norm(block, "rms", predicate=is_ln)
    assert isinstance(block.ln1, N.RMSNorm) and torch.equal(block.ln1.weight, gamma) and block.ln2.weight is None
    assert block.ln1.eps == block.ln2.eps == 1e-5  # the LayerNorms' eps, inherited
    h = nn.functional.rms_norm(x, (8,), gamma, eps=1e-5)
    torch.testing.assert_close(block(x), nn.functional.rms_norm(block.fc(h), (8,), eps=1e-5))
    with pytest.raises(ValueError, match=r"cannot convert ln1 \(LayerNorm\) to 'group': it normalizes the last dimension"):
        N.convert_norm(Block(), "group", predicate=is_ln)

    class LayerNorm2d(nn.LayerNorm):  # ConvNeXt's channels-first LayerNorm
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    with pytest.raises(ValueError, match=r"LayerNorm2d\): it has its own forward"):
        N.convert_norm(nn.Sequential(LayerNorm2d(4)), "rms", predicate=is_ln)


def test_group_norm_for_features_without_positions_never_normalizes_single_values() -> None:
    from batchlab.norm import convert_norm, create_norm

    torch.manual_seed(0)
    mlp = convert_norm(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)), "group")
    assert mlp[1].num_groups == 2  # 4 channels per group (8 groups of one value each output a constant)
    out = mlp(torch.randn(16, 4))
    assert float(out.std(dim=0).min()) > 1e-3  # the output still depends on the input
    assert create_norm("group", 100, dims=0).num_groups == 5 and create_norm("group", 32, dims=2).num_groups == 8
    with pytest.raises(ValueError, match="normalizes single values"):
        create_norm("group", 8, dims=0, num_groups=8)
    one_each = create_norm("group", 8, dims=1, num_groups=8)  # a BatchNorm1d's place: fine on (N, C, L)
    assert one_each(torch.randn(2, 8, 5)).shape == (2, 8, 5)
    with pytest.raises(ValueError, match="one channel per group got a 2-D"):
        one_each(torch.randn(3, 8))


def test_layer_norms_inside_torchs_transformer_layers_are_not_converted_to_another_kind() -> None:
    from batchlab.norm import convert_norm

    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
    model = nn.Sequential(nn.LayerNorm(16), enc, nn.LayerNorm(16))
    with pytest.raises(ValueError, match=r"1\.layers\.0\.norm1 .* fused inference path, .*nothing was converted"):
        convert_norm(model, "rms", predicate=lambda m: isinstance(m, nn.LayerNorm))
    assert type(model[0]) is nn.LayerNorm  # refused before anything was replaced
    convert_norm(model, "layer", predicate=lambda m: isinstance(m, nn.LayerNorm))  # a LayerNorm is fine there
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    mlp = convert_norm(nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16, eps=1e-6)), "rms",
                       predicate=lambda m: isinstance(m, nn.LayerNorm))
    assert mlp[1].eps == 1e-6  # rms inherits eps
