"""batchlab's normalization layers against torch's built-ins: forward, backward, running buffers."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

import batchlab.norm as N
from batchlab.norm import _kernels as kernels
from batchlab.norm import functional as BF
from tests.helpers.norm import assert_close


TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10)}
SHAPES = {1: [(16, 5), (8, 5, 7)], 2: [(6, 5, 4, 3)], 3: [(4, 5, 3, 2, 3)]}
OURS = {1: N.BatchNorm1d, 2: N.BatchNorm2d, 3: N.BatchNorm3d}
TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _run_pair(ours: nn.Module, ref: nn.Module, x: torch.Tensor, steps: int, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOL[dtype]
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        xs = (x * (1 + step) + step).detach()
        xa, xb = xs.clone().requires_grad_(), xs.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        assert_close(ya, yb, atol, rtol, f"{what} step {step} output")
        gy = torch.randn(ya.shape, generator=g, dtype=dtype)
        ya.backward(gy)
        yb.backward(gy)
        assert_close(xa.grad, xb.grad, atol * 10, rtol * 10, f"{what} step {step} input grad")
        if ours.weight is not None:
            assert_close(ours.weight.grad, ref.weight.grad, atol * 100, rtol * 10, f"{what} weight grad")
            assert_close(ours.bias.grad, ref.bias.grad, atol * 100, rtol * 10, f"{what} bias grad")
    sa, sb = ours.state_dict(), ref.state_dict()
    assert list(sa) == list(sb), f"{what}: state_dict keys {list(sa)} != {list(sb)}"
    for k in sa:
        if sa[k].is_floating_point():
            assert_close(sa[k], sb[k], atol, rtol, f"{what} {k}")
        else:
            assert torch.equal(sa[k], sb[k]), f"{what} {k}: {sa[k]} != {sb[k]}"


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "affine,momentum,track,eps",
    [(True, 0.1, True, 1e-5), (False, 0.3, True, 1e-3), (True, None, True, 1e-5), (True, 0.1, False, 1e-5), (False, None, False, 0.1)],
)
def test_batchnorm_matches_torch_train_and_eval(dims: int, dtype: torch.dtype, affine: bool, momentum: float | None, track: bool, eps: float) -> None:
    for shape in SHAPES[dims]:
        torch.manual_seed(0)
        kw = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
        ours, ref = OURS[dims](shape[1], **kw), TORCH[dims](shape[1], **kw)
        if affine:
            with torch.no_grad():
                ref.weight.uniform_(0.5, 1.5)
                ref.bias.uniform_(-1, 1)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(shape, dtype=dtype) * 2 + 0.5
        what = f"BatchNorm{dims}d{shape} {dtype} affine={affine} momentum={momentum} track={track} eps={eps}"
        _run_pair(ours, ref, x, 3, dtype, what + " train")
        ours.eval()
        ref.eval()
        _run_pair(ours, ref, x, 1, dtype, what + " eval")


def test_batchnorm_track_running_stats_switched_off_after_construction() -> None:
    # torch: training does not touch the buffers, eval still uses them.
    ours, ref = N.BatchNorm2d(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.running_mean.fill_(0.5)
    ours.load_state_dict(ref.state_dict())
    ours.track_running_stats = ref.track_running_stats = False
    x = torch.randn(4, 3, 2, 2)
    _run_pair(ours, ref, x, 2, torch.float32, "untracked train")
    ours.eval()
    ref.eval()
    _run_pair(ours, ref, x, 1, torch.float32, "untracked eval")


def test_checkpoint_round_trip_with_torch() -> None:
    ref = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ref.train()
    for _ in range(3):
        ref(torch.randn(5, 2, 6, 6))
    ours = nn.Sequential(nn.Conv2d(2, 4, 3), N.BatchNorm2d(4), nn.ReLU())
    ours.load_state_dict(ref.state_dict())  # strict: same keys
    back = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    back.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, 6, 6)
    ref.eval(), ours.eval(), back.eval()
    assert_close(ours(x), ref(x), 1e-6, 1e-6, "torch -> batchlab eval")
    assert_close(back(x), ref(x), 0, 0, "batchlab -> torch eval")
    assert int(ours[1].num_batches_tracked) == 3


def test_old_checkpoint_without_num_batches_tracked_loads() -> None:
    sd = nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    bn = N.BatchNorm1d(3)
    bn.load_state_dict(sd)
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize(
    "layer,shape",
    [
        (N.BatchNorm1d(3), (1, 3)),
        (N.BatchNorm1d(3), (1, 3, 1)),
        (N.BatchNorm2d(3), (1, 3, 1, 1)),
        (N.BatchNorm3d(3), (1, 3, 1, 1, 1)),
        (N.BatchRenorm2d(3), (1, 3, 1, 1)),
        (N.GhostBatchNorm1d(3, virtual_batch_size=4), (1, 3)),
        (N.GhostBatchNorm1d(3, virtual_batch_size=4), (5, 3)),  # last ghost batch has one sample
        (N.SyncBatchNorm(3), (1, 3)),
        (N.CaffeBatchNorm(3), (1, 3, 1, 1)),
    ],
)
def test_one_value_per_channel_raises_torch_message(layer: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    with pytest.raises(ValueError) as ref_err:
        nn.BatchNorm1d(3)(torch.randn(1, 3))
    assert "Expected more than 1 value per channel when training, got input size" in str(ref_err.value)
    msg = "Expected more than 1 value per channel when training, got input size torch.Size"
    with pytest.raises(ValueError, match=msg):
        layer.train()(x)


def test_one_value_message_identical_to_torch() -> None:
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError) as a:
        N.BatchNorm2d(4)(x)
    with pytest.raises(ValueError) as b:
        nn.BatchNorm2d(4)(x)
    assert str(a.value) == str(b.value)


@pytest.mark.parametrize("cls,ref,bad", [(N.BatchNorm1d, nn.BatchNorm1d, 4), (N.BatchNorm2d, nn.BatchNorm2d, 3), (N.BatchNorm3d, nn.BatchNorm3d, 4)])
def test_wrong_input_dims_message_matches_torch(cls: type, ref: type, bad: int) -> None:
    x = torch.randn(*([2] * bad))
    with pytest.raises(ValueError) as b:
        ref(2)(x)
    with pytest.raises(ValueError, match=f"^{str(b.value)}$".replace("(", r"\(").replace(")", r"\)")):
        cls(2)(x)


@pytest.mark.parametrize(
    "layer_fn",
    [
        lambda c: N.BatchNorm2d(c),
        lambda c: N.BatchRenorm2d(c),
        lambda c: N.BatchRenorm2d(c, warmup_steps=0, rmax_steps=0, dmax_steps=0),
        lambda c: N.GhostBatchNorm2d(c, virtual_batch_size=4),
        lambda c: N.GhostBatchNorm2d(c, virtual_batch_size=4, impl="vectorized"),
        lambda c: N.GroupNorm(c, 2),
        lambda c: N.InstanceNorm2d(c, affine=True),
        lambda c: N.SyncBatchNorm(c),
        lambda c: N.CaffeBatchNorm(c),
    ],
    ids=["batch", "renorm", "renorm-active", "ghost", "ghost-vectorized", "group", "instance", "sync", "caffe"],
)
def test_hard_inputs_large_offset_and_constant_channels(layer_fn) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    layer = layer_fn(4)
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64) + 1e6
    x[:, 2:] = 3.0  # constant channels (zero variance); for GroupNorm(4, 2) the whole group 1
    x.requires_grad_()
    y = layer.double().train()(x)
    y.sum().backward()
    assert torch.isfinite(y).all(), "non-finite output"
    assert torch.isfinite(x.grad).all(), "non-finite input gradient"
    # constant channels normalize to beta (0); with active renorm limits, to d = clip((3 - 0) / 1, -5, 5)
    expected = 3.0 if isinstance(layer, N.BatchRenorm2d) and layer.schedule.warmup_steps == 0 else 0.0
    got = (y[:, 2:] - expected).abs().max().item()
    assert got < 1e-3, f"constant channel should give {expected}, max deviation {got}"
    # The offset must not destroy the normalization: unit variance per normalized unit.
    std = y[:, :2].std().item()
    assert 0.9 < std < 1.1, f"std after normalization with a 1e6 offset: {std}"
    if hasattr(layer, "running_var") and layer.running_var is not None:
        assert torch.isfinite(layer.running_var).all() and torch.isfinite(layer.running_mean).all()


def test_layernorm_large_offset_and_constant_sample() -> None:
    x = torch.randn(4, 3, 5, dtype=torch.float64) + 1e6
    x[1] = 7.0  # one sample constant over everything LayerNorm normalizes
    x.requires_grad_()
    y = N.LayerNorm((3, 5)).double()(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert y[1].abs().max().item() == 0.0, "a constant sample normalizes to beta"
    std = y[0].std(correction=0).item()
    assert abs(std - 1) < 1e-3, f"std {std} after normalization with a 1e6 offset"


def test_float32_large_offset_finite() -> None:
    x = torch.randn(16, 3, 4, 4) + 1e6
    for layer in [N.BatchNorm2d(3), N.BatchRenorm2d(3), N.GhostBatchNorm2d(3, virtual_batch_size=4, impl="vectorized"), N.CaffeBatchNorm(3)]:
        y = layer(x)
        assert torch.isfinite(y).all(), type(layer).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm_layernorm_instancenorm_match_torch(dtype: torch.dtype, affine: bool) -> None:
    atol, rtol = TOL[dtype]
    torch.manual_seed(0)
    cases = [
        (N.GroupNorm(6, 3, eps=1e-3, affine=affine), nn.GroupNorm(3, 6, eps=1e-3, affine=affine), (4, 6, 5, 5)),
        (N.GroupNorm(6, 2, affine=affine), nn.GroupNorm(2, 6, affine=affine), (4, 6)),
        (N.GroupNorm(6, 6, affine=affine), nn.GroupNorm(6, 6, affine=affine), (2, 6, 3, 3, 3)),
        (N.LayerNorm((5, 4), elementwise_affine=affine), nn.LayerNorm((5, 4), elementwise_affine=affine), (3, 2, 5, 4)),
        (N.LayerNorm(7, eps=0.1, elementwise_affine=affine), nn.LayerNorm(7, eps=0.1, elementwise_affine=affine), (9, 7)),
        (N.InstanceNorm1d(3, affine=affine), nn.InstanceNorm1d(3, affine=affine), (4, 3, 9)),
        (N.InstanceNorm2d(3, affine=affine), nn.InstanceNorm2d(3, affine=affine), (4, 3, 5, 6)),
        (N.InstanceNorm2d(3, affine=affine), nn.InstanceNorm2d(3, affine=affine), (3, 5, 6)),  # unbatched
        (N.InstanceNorm3d(3, affine=affine), nn.InstanceNorm3d(3, affine=affine), (2, 3, 3, 4, 2)),
        (N.InstanceNorm2d(3, affine=affine, track_running_stats=True, momentum=0.2), nn.InstanceNorm2d(3, affine=affine, track_running_stats=True, momentum=0.2), (4, 3, 5, 6)),
    ]
    for ours, ref, shape in cases:
        ours, ref = ours.to(dtype), ref.to(dtype)
        if affine:
            with torch.no_grad():
                for p in ref.parameters():
                    p.uniform_(0.5, 1.5)
        ours.load_state_dict(ref.state_dict())
        what = f"{type(ours).__name__}{shape} {dtype} affine={affine}"
        x = torch.randn(shape, dtype=dtype) * 3 + 1
        _run_pair(ours, ref, x, 2, dtype, what)
        ours.eval(), ref.eval()
        _run_pair(ours, ref, x, 1, dtype, what + " eval")


def test_instancenorm_defaults_are_torchs() -> None:
    for ours, ref in [(N.InstanceNorm1d(4), nn.InstanceNorm1d(4)), (N.InstanceNorm2d(4), nn.InstanceNorm2d(4))]:
        assert (ours.affine, ours.track_running_stats) == (ref.affine, ref.track_running_stats) == (False, False)
        assert list(ours.state_dict()) == list(ref.state_dict()) == []


def test_groupnorm_argument_errors_name_the_values() -> None:
    with pytest.raises(ValueError, match=r"num_groups must be a positive divisor of num_channels \(6\), got 4"):
        N.GroupNorm(6, 4)
    with pytest.raises(ValueError, match="num_channels first"):
        N.GroupNorm(32, 64)  # torch's argument order by mistake
    assert N.GroupNorm(12).num_groups == 6
    assert N.GroupNorm(7).num_groups == 7
    assert N.GroupNorm(64).num_groups == 8


@pytest.mark.parametrize("dims,shape", [(1, (64, 3)), (2, (32, 3, 4, 4)), (3, (16, 2, 2, 3, 2))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_bn_equals_loop_of_torch_bn_over_virtual_batches(dims: int, shape: tuple[int, ...], momentum: float | None) -> None:
    cls = {1: N.GhostBatchNorm1d, 2: N.GhostBatchNorm2d, 3: N.GhostBatchNorm3d}[dims]
    impls = [("native", 8), ("vectorized", 8), ("native", 5), ("native", 1000), ("auto", 8), ("auto", 5)]
    if dims == 1 and kernels.available():
        impls += [("fused", 8), ("fused", 5), ("fused", 1000)]
    for impl, vbs in impls:
        torch.manual_seed(0)
        ghost = cls(shape[1], virtual_batch_size=vbs, momentum=momentum, impl=impl).double()
        ref = TORCH[dims](shape[1], momentum=momentum).double()
        with torch.no_grad():
            ghost.weight.uniform_(0.5, 1.5)
            ghost.bias.uniform_(-1, 1)
        ref.load_state_dict(ghost.state_dict())
        for step in range(3):
            x = (torch.randn(shape, dtype=torch.float64) * (step + 1) + step).requires_grad_()
            xr = x.detach().clone().requires_grad_()
            y = ghost(x)
            yr = torch.cat([ref(c) for c in xr.split(vbs)])
            gy = torch.randn_like(y)
            y.backward(gy)
            yr.backward(gy)
            what = f"ghost {impl} vbs={vbs} momentum={momentum} step {step}"
            assert_close(y, yr, 1e-10, 1e-10, what + " output")
            assert_close(x.grad, xr.grad, 1e-9, 1e-9, what + " input grad")
            assert_close(ghost.weight.grad, ref.weight.grad, 1e-9, 1e-9, what + " weight grad")
            assert_close(ghost.bias.grad, ref.bias.grad, 1e-9, 1e-9, what + " bias grad")
            assert_close(ghost.running_mean, ref.running_mean, 1e-12, 1e-10, what + " running_mean")
            assert_close(ghost.running_var, ref.running_var, 1e-12, 1e-10, what + " running_var")
            assert int(ghost.num_batches_tracked) == int(ref.num_batches_tracked), what
        ghost.eval(), ref.eval()
        x = torch.randn(shape, dtype=torch.float64)
        assert_close(ghost(x), ref(x), 1e-12, 1e-12, f"ghost {impl} eval")


def test_ghost_vectorized_needs_divisible_batch() -> None:
    with pytest.raises(ValueError, match=r"batch size \(10\) to be a multiple of virtual_batch_size \(4\)"):
        N.GhostBatchNorm1d(3, virtual_batch_size=4, impl="vectorized")(torch.randn(10, 3))
    with pytest.raises(ValueError, match="impl must be one of 'auto', 'fused', 'native', 'vectorized', got 'fast'"):
        N.GhostBatchNorm1d(3, impl="fast")
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int, got 0"):
        N.GhostBatchNorm1d(3, virtual_batch_size=0)


def test_ghost_float32_vectorized_close_to_native() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 8, 6, 6) * 4 + 10
    a = N.GhostBatchNorm2d(8, virtual_batch_size=16)
    b = N.GhostBatchNorm2d(8, virtual_batch_size=16, impl="vectorized")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    assert_close(yb, ya, 1e-5, 1e-5, "vectorized vs native output float32")
    assert_close(xb.grad, xa.grad, 1e-5, 1e-4, "vectorized vs native grad float32")
    assert_close(b.running_var, a.running_var, 1e-5, 1e-5, "running_var")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dims,shape", [(1, (12, 4)), (2, (6, 4, 3, 3)), (3, (4, 4, 2, 3, 2))])
def test_batch_renorm_with_rmax1_dmax0_is_batchnorm(dims: int, shape: tuple[int, ...], momentum: float | None) -> None:
    cls = {1: N.BatchRenorm1d, 2: N.BatchRenorm2d, 3: N.BatchRenorm3d}[dims]
    rn = cls(shape[1], rmax=1.0, dmax=0.0, momentum=momentum).double()
    ref = TORCH[dims](shape[1], momentum=momentum).double()
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    rn.load_state_dict(ref.state_dict())
    _run_pair(rn, ref, torch.randn(shape, dtype=torch.float64) * 2, 3, torch.float64, f"renorm{dims}d r=1 d=0")
    rn.eval(), ref.eval()
    _run_pair(rn, ref, torch.randn(shape, dtype=torch.float64), 1, torch.float64, f"renorm{dims}d eval")


def test_batch_renorm_r_d_follow_the_paper() -> None:
    torch.manual_seed(0)
    rn = N.BatchRenorm2d(3, rmax=2.0, dmax=0.5, warmup_steps=0, rmax_steps=0, dmax_steps=0).double()
    with torch.no_grad():
        rn.running_mean.copy_(torch.tensor([0.0, 5.0, -0.1], dtype=torch.float64))
        rn.running_var.copy_(torch.tensor([1.0, 1.0, 100.0], dtype=torch.float64))
        rn.weight.copy_(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64) * 3
    y = rn(x)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    rm0 = torch.tensor([0.0, 5.0, -0.1], dtype=torch.float64)
    rv0 = torch.tensor([1.0, 1.0, 100.0], dtype=torch.float64)
    std = (rv0 + rn.eps).sqrt()
    r = ((var + rn.eps).sqrt() / std).clamp(0.5, 2.0)
    d = ((mean - rm0) / std).clamp(-0.5, 0.5)
    xhat = (x - mean.view(1, 3, 1, 1)) / (var + rn.eps).sqrt().view(1, 3, 1, 1)
    expected = rn.weight.detach().view(1, 3, 1, 1) * (xhat * r.view(1, 3, 1, 1) + d.view(1, 3, 1, 1)) + rn.bias.detach().view(1, 3, 1, 1)
    assert_close(y, expected, 1e-12, 1e-12, "renorm output vs paper formula")
    assert d[1].item() == -0.5 and r[2].item() == 0.5, f"clipping not exercised: r={r}, d={d}"


def test_renorm_schedule() -> None:
    s = N.RenormSchedule()
    assert s.limits(0) == (1.0, 0.0)
    assert s.limits(4999) == (1.0, 0.0)
    assert s.limits(5000) == (1.0, 0.0)
    r, d = s.limits(15000)
    assert r == pytest.approx(1 + 2 * 10000 / 35000) and d == pytest.approx(5 * 10000 / 20000)
    assert s.limits(25000)[1] == 5.0 and s.limits(10**6) == (3.0, 5.0)
    assert N.RenormSchedule.constant(2.0, 1.0).limits(0) == (2.0, 1.0)
    rn = N.BatchRenorm1d(2, warmup_steps=2, rmax_steps=4, dmax_steps=3, rmax=3.0, dmax=1.0)
    seen = []
    for _ in range(5):
        seen.append(rn.current_limits())
        rn(torch.randn(8, 2))
    assert seen == [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0), (2.0, 1.0), (3.0, 1.0)]
    with pytest.raises(ValueError, match="rmax must be a finite number >= 1, got 0.5"):
        N.RenormSchedule(rmax=0.5)
    with pytest.raises(ValueError, match=r"rmax_steps \(10\) and dmax_steps \(25000\) must be >= warmup_steps \(20\)"):
        N.RenormSchedule(warmup_steps=20, rmax_steps=10)
    with pytest.raises(ValueError, match="track_running_stats must be True for Batch Renorm"):
        N.BatchRenorm2d(3, track_running_stats=False)


def test_caffe_batchnorm_semantics() -> None:
    torch.manual_seed(0)
    layer = N.CaffeBatchNorm(3, moving_average_fraction=0.9).double()
    xs = [torch.randn(4, 3, 2, 2, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    s, M, V = 0.0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for x in xs:
        y = layer(x)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        assert_close(y, (x - mean.view(1, 3, 1, 1)) / (var + 1e-5).sqrt().view(1, 3, 1, 1), 1e-12, 1e-12, "caffe train output")
        s, M, V = 0.9 * s + 1, 0.9 * M + mean, 0.9 * V + var * 16 / 15
    assert layer.scale_factor.item() == pytest.approx(s)
    assert_close(layer.mean, M, 1e-12, 1e-12, "caffe mean blob")
    assert_close(layer.variance, V, 1e-12, 1e-12, "caffe variance blob")
    layer.eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert_close(layer(x), (x - (M / s).view(1, 3, 1, 1)) / (V / s + 1e-5).sqrt().view(1, 3, 1, 1), 1e-12, 1e-12, "caffe global stats")
    assert list(layer.state_dict()) == ["mean", "variance", "scale_factor"]
    fresh = N.CaffeBatchNorm(3, use_global_stats=True)
    assert_close(fresh(torch.ones(2, 3)), torch.ones(2, 3) / (1e-5) ** 0.5, 1e-2, 1e-6, "s == 0 gives zero statistics")
    assert fresh.scale_factor.item() == 0.0, "use_global_stats=True must not accumulate"


def test_constructor_errors_name_argument_and_value() -> None:
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        N.BatchNorm2d(0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\] or None \(cumulative average\), got 2"):
        N.BatchNorm2d(3, momentum=2)
    with pytest.raises(ValueError, match=r"moving_average_fraction must be in \[0, 1\], got 1.5"):
        N.CaffeBatchNorm(3, moving_average_fraction=1.5)
    with pytest.raises(ValueError, match="normalized_shape must be a positive int or a tuple of them, got 0"):
        N.LayerNorm(0)


def test_frozen_batchnorm_stays_frozen() -> None:
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(8, 3, 2, 2) + 2)
    bn.eval()
    fz = N.FrozenBatchNorm.from_batchnorm(bn)
    fz.train()
    x = torch.randn(4, 3, 2, 2)
    assert_close(fz(x), bn(x), 1e-6, 1e-6, "frozen vs eval BN")
    assert list(fz.parameters()) == []
    assert list(fz.state_dict()) == list(bn.state_dict())


def test_functional_matches_module_and_torch() -> None:
    x = torch.randn(6, 4, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    y = BF.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
    ref_rm, ref_rv = torch.zeros(4), torch.ones(4)
    yr = torch.nn.functional.batch_norm(x, ref_rm, ref_rv, None, None, True, 0.1, 1e-5)
    assert_close(y, yr, 0, 0, "functional batch_norm")
    assert_close(rm, ref_rm, 0, 0, "functional running_mean")
    with pytest.raises(ValueError, match=r"num_groups must divide the number of channels, got num_groups=3"):
        BF.group_norm(x, 3)
    for a, b in itertools.product([0.5], [-1.0]):
        with pytest.raises(ValueError, match=f"rmax must be a finite number >= 1, got {a}"):
            BF.batch_renorm(x, rm, rv, training=True, rmax=a)
        with pytest.raises(ValueError, match=f"dmax must be a finite number >= 0, got {b}"):
            BF.batch_renorm(x, rm, rv, training=True, dmax=b)


@pytest.mark.parametrize("affine", [False, True])
def test_ghost_bn_without_affine_and_channels_last(affine: bool) -> None:
    torch.manual_seed(3)
    ghost = N.GhostBatchNorm2d(3, virtual_batch_size=3, affine=affine, momentum=None).double()
    ref = nn.BatchNorm2d(3, affine=affine, momentum=None).double()
    for layout in (torch.contiguous_format, torch.channels_last):  # the slice-writing path in both layouts
        x = (torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1).to(memory_format=layout).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y, yr = ghost(x), torch.cat([ref(c) for c in xr.split(3)])
        gy = torch.randn_like(y)
        y.backward(gy)
        yr.backward(gy)
        assert_close(y, yr, 1e-12, 1e-12, f"ghost affine={affine} {layout} output")
        assert_close(x.grad, xr.grad, 1e-10, 1e-10, f"ghost affine={affine} {layout} input grad")
        assert_close(ghost.running_var, ref.running_var, 1e-12, 1e-12, f"ghost affine={affine} {layout} running_var")
    if affine:
        assert_close(ghost.weight.grad, ref.weight.grad, 1e-10, 1e-10, "ghost weight grad")


def test_ghost_bn_on_a_strided_input_concatenates_and_matches_the_loop() -> None:
    torch.manual_seed(4)
    ghost = N.GhostBatchNorm2d(3, virtual_batch_size=3).double()
    ref = nn.BatchNorm2d(3).double()
    x = (torch.randn(8, 3, 4, 8, dtype=torch.float64) * 2 + 1)[..., ::2].requires_grad_()  # neither layout is dense
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    xr = x.detach().clone().requires_grad_()
    y, yr = ghost(x), torch.cat([ref(c) for c in xr.split(3)])
    gy = torch.randn_like(y)
    y.backward(gy)
    yr.backward(gy)
    assert_close(y, yr, 1e-12, 1e-12, "ghost strided output")
    assert_close(x.grad, xr.grad, 1e-10, 1e-10, "ghost strided input grad")
    assert_close(ghost.running_var, ref.running_var, 1e-12, 1e-12, "ghost strided running_var")
