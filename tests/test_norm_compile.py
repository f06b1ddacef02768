"""Every normalization layer under ``torch.compile(fullgraph=True)`` (a graph break raises) and on
channels_last input: same numbers as eager / contiguous, torch's output layout.

Compiling with inductor costs 5 to 15 s per layer on this 2-core machine (C++ codegen), so the
per-layer tests use the ``aot_eager`` backend, which runs the same Dynamo capture (where graph
breaks happen) and AOTAutograd (forward and backward graphs, functionalized buffer updates);
one inductor test (marked slow, about 13 s) covers the code generation end to end.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import batchlab.norm as N
from tests.helpers.norm import assert_close

# name -> (layer factory, input shape)
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "batch": (lambda: N.BatchNorm2d(4), (8, 4, 3, 3)),
    "batch1d": (lambda: N.BatchNorm1d(4), (8, 4)),
    "batch-cumulative": (lambda: N.BatchNorm2d(4, momentum=None), (8, 4, 3, 3)),
    "batch1d-cumulative": (lambda: N.BatchNorm1d(4, momentum=None), (8, 4)),
    "renorm": (lambda: N.BatchRenorm2d(4, warmup_steps=0, rmax_steps=0, dmax_steps=0, rmax=1.5, dmax=0.5), (8, 4, 3, 3)),
    "renorm-cumulative": (lambda: N.BatchRenorm1d(4, momentum=None, warmup_steps=1, rmax_steps=3, dmax_steps=2), (8, 4)),
    "ghost": (lambda: N.GhostBatchNorm2d(4, virtual_batch_size=3), (8, 4, 3, 3)),
    "ghost1d": (lambda: N.GhostBatchNorm1d(4, virtual_batch_size=2), (8, 4)),
    "ghost-cumulative": (lambda: N.GhostBatchNorm2d(4, virtual_batch_size=4, momentum=None), (8, 4, 3, 3)),
    "sync": (lambda: N.SyncBatchNorm(4), (8, 4, 3, 3)),
    "sync-cumulative": (lambda: N.SyncBatchNorm(4, momentum=None), (8, 4, 3, 3)),
    "caffe": (lambda: N.CaffeBatchNorm(4), (8, 4, 3, 3)),
    "frozen": (lambda: N.FrozenBatchNorm(4), (8, 4, 3, 3)),
    "group": (lambda: N.GroupNorm(4, 2), (8, 4, 3, 3)),
    "layer": (lambda: N.LayerNorm((4, 3, 3)), (8, 4, 3, 3)),
    "rms": (lambda: N.RMSNorm(3), (8, 4, 3, 3)),
    "instance": (lambda: N.InstanceNorm2d(4, affine=True, track_running_stats=True), (8, 4, 3, 3)),
    "batch_act": (lambda: N.BatchNormAct2d(4, act_layer="gelu"), (8, 4, 3, 3)),
    "batch_act-cumulative": (lambda: N.BatchNormAct2d(4, momentum=None, act_layer="relu"), (8, 4, 3, 3)),
    "group_act": (lambda: N.GroupNormAct(4, 2), (8, 4, 3, 3)),
    "layer_act": (lambda: N.LayerNormAct(3, act_layer="silu"), (8, 4, 3, 3)),
}


def _init(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in list(layer.parameters()) + [b for n, b in layer.named_buffers() if n in ("weight", "bias")]:
            p.uniform_(0.5, 1.5)
    return layer


def _steps(layer: nn.Module, shape: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor], steps: int = 3) -> list[torch.Tensor]:
    """Outputs, input gradients and parameter gradients of a few training steps, then eval."""
    g = torch.Generator().manual_seed(1)
    out = []
    layer.train()
    for step in range(steps):
        x = (torch.randn(shape, generator=g) * (step + 1) + step).requires_grad_()
        y = fn(x)
        y.backward(torch.randn(shape, generator=g))
        out += [y.detach(), x.grad]
    out += [p.grad for p in layer.parameters()]
    layer.eval()
    out.append(fn(torch.randn(shape, generator=g)).detach())
    return out


def _eager_and_compiled(name: str) -> tuple[nn.Module, nn.Module, Callable[[torch.Tensor], torch.Tensor], tuple[int, ...]]:
    """The layer ``name`` (initialized), an identical copy, that copy compiled with fullgraph, and its input shape."""
    make, shape = LAYERS[name]
    eager = _init(make())
    ours = copy.deepcopy(eager)
    torch._dynamo.reset()
    return eager, ours, torch.compile(ours, fullgraph=True, backend="aot_eager"), shape


@pytest.mark.parametrize("name", list(LAYERS))
def test_fullgraph_compile_equals_eager(name: str) -> None:
    eager, compiled_layer, compiled, shape = _eager_and_compiled(name)
    want = _steps(eager, shape, eager)
    got = _steps(compiled_layer, shape, compiled)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-5, 1e-4, f"{name}: compiled vs eager, tensor {i}")
    for (k, a), (_, b) in zip(compiled_layer.state_dict().items(), eager.state_dict().items()):
        if a.is_floating_point():
            assert_close(a, b, 1e-5, 1e-5, f"{name}: buffer {k}")
        else:
            assert torch.equal(a, b), f"{name}: {k} {a} != {b}"


@pytest.mark.parametrize("name", list(LAYERS))
def test_fullgraph_compile_survives_a_new_batch_size(name: str) -> None:
    # the second size recompiles with a symbolic batch dimension (a short last batch of an epoch);
    # Renorm, Caffe BN and tracked InstanceNorm failed there: their statistics kernel has no fake-tensor rule
    eager, ours, compiled, shape = _eager_and_compiled(name)
    g = torch.Generator().manual_seed(2)
    for n in (8, 6, 4):  # 6 and 4 leave a short virtual batch for Ghost BN
        x = torch.randn((n, *shape[1:]), generator=g) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = compiled(xa), eager(xb)
        assert_close(ya, yb, 1e-5, 1e-4, f"{name}: batch {n}")
        w = torch.randn(ya.shape, generator=g)
        ya.backward(w)
        yb.backward(w)
        assert_close(xa.grad, xb.grad, 1e-5, 1e-4, f"{name}: input gradient at batch {n}")
    for (k, a), b in zip(ours.named_parameters(), eager.parameters()):
        assert_close(a.grad, b.grad, 1e-5, 1e-4, f"{name}: gradient of {k}")


@pytest.mark.parametrize("dynamic", [None, True])
def test_ghost_batchnorm_compiles_fullgraph_across_batch_sizes_and_a_partial_last_batch(dynamic) -> None:  # type: ignore[no-untyped-def]
    from batchlab.norm import GhostBatchNorm2d

    torch.manual_seed(0)
    eager = GhostBatchNorm2d(4, virtual_batch_size=8).train()
    ours = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for n in (16, 24, 20):  # a new batch size recompiles with a symbolic size; 20 = 8 + 8 + 4
        x = torch.randn(n, 4, 3, 3)
        assert_close(compiled(x), eager(x), 1e-5, 1e-5, f"batch {n}")
    assert torch.equal(ours.num_batches_tracked, eager.num_batches_tracked)


def test_ghost_batchnorm_refuses_torchscript_with_the_way_out() -> None:
    from batchlab.norm import GhostBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), GhostBatchNorm2d(4, 2))
    for _ in range(2):  # the same clear error again, not TorchScript's "Can't redefine method"
        with pytest.raises(RuntimeError, match="torch.compile or torch.export"):
            torch.jit.script(model)


def test_torch_batchnorm_with_cumulative_average_breaks_fullgraph_but_batchlabs_does_not() -> None:
    # momentum=None: torch's forward reads num_batches_tracked as a Python float (a data-dependent
    # graph break); batchlab's BatchNorm*d keeps the factor a tensor under compile (the
    # "*-cumulative" rows above check its values against eager mode)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="data-dependent"):
        torch.compile(nn.BatchNorm1d(4, momentum=None), fullgraph=True, backend="aot_eager")(torch.randn(8, 4))
    torch._dynamo.reset()
    ours = N.BatchNorm1d(4, momentum=None)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    ref = nn.BatchNorm1d(4, momentum=None)
    for _ in range(3):
        x = torch.randn(8, 4) * 3 + 1
        compiled(x), ref(x)
        compiled(x[:0])  # an empty batch counts but leaves the statistics, as in torch
        ref(x[:0])
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 6
    assert_close(ours.running_mean, ref.running_mean, 1e-6, 1e-6, "cumulative running_mean")
    assert_close(ours.running_var, ref.running_var, 1e-5, 1e-5, "cumulative running_var")


@pytest.mark.slow
def test_inductor_compiles_batch_renorm_without_graph_break() -> None:
    eager = _init(N.BatchRenorm2d(4, warmup_steps=0, rmax_steps=0, dmax_steps=0, rmax=1.5, dmax=0.5))
    compiled_layer = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_layer, fullgraph=True)
    want = _steps(eager, (8, 4, 3, 3), eager, steps=2)
    got = _steps(compiled_layer, (8, 4, 3, 3), compiled, steps=2)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-5, 1e-4, f"inductor renorm tensor {i}")
    assert_close(compiled_layer.running_var, eager.running_var, 1e-6, 1e-6, "inductor renorm running_var")


# ----------------------------------------------------------------------------- channels_last

CL_LAYERS = {k: v for k, v in LAYERS.items() if len(v[1]) == 4 and k not in ("layer", "rms", "layer_act")}
TORCH_TWIN: dict[str, Callable[[], nn.Module]] = {
    "batch": lambda: nn.BatchNorm2d(4),
    "group": lambda: nn.GroupNorm(2, 4),
    "instance": lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
}


@pytest.mark.parametrize("name", list(CL_LAYERS))
def test_channels_last_equals_contiguous_and_keeps_the_layout(name: str) -> None:
    make, shape = CL_LAYERS[name]
    a = _init(make())
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g) * 2 + 1
    gy = torch.randn(shape, generator=g)
    xa = x.clone().requires_grad_()
    xb = x.to(memory_format=torch.channels_last).requires_grad_()
    ya, yb = a(xa), b(xb)
    ya.backward(gy)
    yb.backward(gy.to(memory_format=torch.channels_last))
    assert_close(yb, ya, 1e-5, 1e-5, f"{name} channels_last output")
    assert_close(xb.grad, xa.grad, 1e-5, 1e-4, f"{name} channels_last input grad")
    for (k, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        if pa.is_floating_point():
            assert_close(pb, pa, 1e-5, 1e-5, f"{name} channels_last {k}")
    # the layout torch's own layer gives (channels_last in, channels_last out for batch norm)
    twin = TORCH_TWIN.get(name, lambda: nn.BatchNorm2d(4))()
    want_cl = twin(x.to(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    assert yb.is_contiguous(memory_format=torch.channels_last) == want_cl or name == "instance", (
        f"{name}: channels_last output {yb.is_contiguous(memory_format=torch.channels_last)}, torch's {want_cl}"
    )


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batchnorm_scripts_with_torchscript_as_torchs(momentum, dims) -> None:  # type: ignore[no-untyped-def]
    # batchlab's BatchNorm*d has its own forward (the compile branch for momentum=None); it must stay
    # scriptable like torch's and compute what torch's computes, buffers included
    import warnings

    ours = {1: N.BatchNorm1d, 2: N.BatchNorm2d, 3: N.BatchNorm3d}[dims](3, momentum=momentum)
    ref = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](3, momentum=momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(ours)
    g = torch.Generator().manual_seed(0)
    shape = (6, 3) + ((2,) * dims if dims > 1 else ())
    for step in range(3):
        x = torch.randn(shape, generator=g) * (step + 1) + step
        assert_close(scripted(x), ref(x), 1e-6, 1e-6, f"train step {step}")
    assert int(scripted.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    assert_close(scripted.running_var, ref.running_var, 1e-6, 1e-6, "running_var")
    scripted.eval(), ref.eval()
    x = torch.randn(shape, generator=g)
    assert_close(scripted(x), ref(x), 1e-6, 1e-6, "eval")


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("tracked", [False, True])
def test_instance_norm_scripts_like_torchs(dims: int, tracked: bool) -> None:
    # torch's InstanceNorm*d scripts, so a model converted to batchlab's must too
    kw = {"affine": tracked, "track_running_stats": tracked}
    torch.manual_seed(0)
    ours = torch.jit.script(getattr(N, f"InstanceNorm{dims}d")(3, **kw))
    ref = getattr(nn, f"InstanceNorm{dims}d")(3, **kw)
    x = torch.randn((2, 3) + (4,) * dims)
    for training in (True, True, False):
        ours.train(training)
        ref.train(training)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        if tracked:
            torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
