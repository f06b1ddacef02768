"""precise_bn, fold_bn, freeze_bn, convert_norm, bn_health, Caffe/darknet converters, registry."""

from __future__ import annotations

import copy
import functools
import warnings
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import batchlab.norm as N




def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------- precise_bn


def _cnn(bn: type = nn.BatchNorm2d) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn(4), nn.ReLU(), nn.Conv2d(4, 5, 1), bn(5), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5))


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, N.BatchNorm2d])
def test_precise_bn_is_population_statistics_whatever_the_split(bn: type) -> None:
    model = _cnn(bn).double()
    data = torch.randn(64, 3, 5, 5, dtype=torch.float64) * 2 + 1
    with torch.no_grad():
        feats = model[0](data)
    pop_mean = feats.mean(dim=(0, 2, 3))
    pop_var = feats.var(dim=(0, 2, 3), correction=1)
    results = []
    for bs in (2, 3, 7, 16, 64):
        m = _cnn(bn).double()
        batches = list(data.split(bs))
        counts = N.precise_bn(m, batches, num_batches=len(batches))
        assert counts["1"] == 64 * 25
        d_mean, d_var = max_diff(m[1].running_mean, pop_mean), max_diff(m[1].running_var, pop_var)
        assert d_mean < 1e-12 and d_var < 1e-12, f"batch size {bs}: first BN differs from population stats by {d_mean:.2e}/{d_var:.2e}"
        results.append(m[1].running_var.clone())
    for bs, r in zip((3, 7, 16, 64), results[1:]):
        assert max_diff(r, results[0]) < 1e-12, f"split into batches of {bs} changed the statistics"


def test_precise_bn_single_layer_float32_invariance_and_restores_state() -> None:
    torch.manual_seed(1)
    data = torch.randn(128, 6) * 3 + 100
    stats = []
    for bs in (2, 5, 32, 64):
        bn = N.BatchNorm1d(6, momentum=None)
        bn.eval()
        before = int(bn.num_batches_tracked)
        N.precise_bn(bn, [(x, torch.zeros(len(x))) for x in data.split(bs)], num_batches=len(range(0, 128, bs)))
        assert bn.momentum is None and not bn.training and int(bn.num_batches_tracked) == before
        assert not bn._forward_pre_hooks, "hook left behind"
        stats.append((bn.running_mean.clone(), bn.running_var.clone()))
    for bs, (m, v) in zip((5, 32, 64), stats[1:]):
        assert max_diff(m, stats[0][0]) < 1e-4 and max_diff(v, stats[0][1]) < 1e-4, f"batch size {bs}"
    assert max_diff(stats[0][0], data.double().mean(0)) < 1e-4
    assert max_diff(stats[0][1], data.double().var(0)) < 1e-3


def test_precise_bn_short_loader_raises_and_leaves_model_unchanged() -> None:
    model = _cnn()
    model.train()
    model[7].eval()  # a mixed-mode model: the modes must come back as they were
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    with pytest.raises(ValueError, match=r"loader yielded 3 batches, fewer than num_batches=5"):
        N.precise_bn(model, iter([torch.randn(4, 3, 5, 5) for _ in range(3)]), num_batches=5)
    assert [m.training for m in model.modules()] == modes
    assert model[1].momentum == 0.1 and model[4].momentum == 0.1
    assert not model[1]._forward_pre_hooks and not model[4]._forward_pre_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), f"{k} changed by a failed precise_bn"
    with pytest.raises(ValueError, match="num_batches must be a positive int, got 0"):
        N.precise_bn(model, [], num_batches=0)
    with pytest.raises(ValueError, match="no batch norm with running statistics"):
        N.precise_bn(nn.Linear(2, 2), [torch.randn(2, 2)], num_batches=1)
    with pytest.raises(TypeError, match=r"loader must yield tensors or .* got dict; .* give forward="):
        N.precise_bn(model, [{"x": 1}], num_batches=1)


def test_precise_bn_restores_on_forward_error() -> None:
    model = _cnn()
    with pytest.raises(RuntimeError):
        N.precise_bn(model, [torch.randn(4, 2, 5, 5)], num_batches=1)  # wrong channel count
    assert model[1].momentum == 0.1 and not model[1]._forward_pre_hooks and model.training


# ----------------------------------------------------------------------------- fold_bn


class Block(nn.Module):
    """A residual block: pairs are found by torch.fx, not by Sequential adjacency."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = N.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.bn3 = N.BatchNorm1d(3, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + x
        return self.bn3(self.head(y.mean(dim=(2, 3))))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(2, 3, 3), N.BatchNorm1d(3), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.body(x)
        return self.body(-x)


def _train_stats(model: nn.Module, shape: tuple[int, ...], steps: int = 3) -> None:
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight") and isinstance(m, (nn.modules.batchnorm._BatchNorm, N.BatchNorm2d, N.BatchNorm1d)) and m.weight is not None:
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1, 1)
        for _ in range(steps):
            model(torch.randn(shape) * 2 + 1)
    model.eval()


@pytest.mark.parametrize(
    "make,shape,folded,method",
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), N.BatchNorm2d(2)), (8, 3, 6, 6), 2, "fx"),
        (lambda: nn.Sequential(nn.Linear(5, 6), N.BatchNorm1d(6), nn.Tanh(), nn.Sequential(nn.Linear(6, 2), nn.BatchNorm1d(2))), (16, 5), 2, "fx"),
        (lambda: nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3), nn.ReLU(), nn.BatchNorm3d(3)), (4, 2, 3, 3, 3), 1, "fx"),
        (Block, (6, 4, 5, 5), 3, "fx"),
        (Untraceable, (8, 2, 9), 1, "sequential"),
    ],
)
def test_fold_bn_matches_eval_outputs(make, shape, folded: int, method: str) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = make()
    _train_stats(model, shape)
    pairs, how = N.find_foldable_pairs(model)
    assert how == method and len(pairs) == folded, f"pairs {pairs} via {how}"
    example = (torch.randn(shape) * 2 + 1).abs() if how == "sequential" else None
    fused = N.fold_bn(model, example_input=example)
    n_bn = sum(N.is_batchnorm(m) for m in model.modules())
    n_left = sum(N.is_batchnorm(m) for m in fused.modules())
    assert n_bn - n_left == folded, f"{n_bn - n_left} folded, expected {folded}"
    x = torch.randn(shape) * 2 + 1
    if isinstance(model, Untraceable):
        x = x.abs()
    with torch.no_grad():
        d = max_diff(fused(x), model(x))
    assert d < 1e-5, f"folded model differs by {d:.2e}"
    assert all(N.is_batchnorm(m) for m in (model.get_submodule(b) for _, b in pairs)), "the original must be left untouched"


class _Taps(nn.Module):
    """Untraceable (a shape-dependent pad) and the first conv's output is also a feature tap."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        taps = []
        for layer in self.features:
            x = layer(x)
            if layer is self.features[0]:
                taps.append(x)
        return x.mean(dim=(2, 3)) + taps[0].mean(dim=(2, 3))


def test_fold_bn_on_an_untraceable_model_checks_each_fold_or_refuses() -> None:
    torch.manual_seed(0)
    model = _Taps()
    _train_stats(model, (4, 3, 6, 6))
    assert N.find_foldable_pairs(model)[1] == "sequential"
    with pytest.raises(ValueError, match=r"fold_bn: torch.fx cannot trace _Taps, .* outputs of features.0, features.3 .* "
                                         r"give example_input="):
        N.fold_bn(model)
    x = torch.randn(4, 3, 7, 7)
    fused = N.fold_bn(model, example_input=x)
    # the tapped conv keeps its BN (folding it would change the tap), the other pair folds
    assert isinstance(fused.features[1], nn.BatchNorm2d) and isinstance(fused.features[4], nn.Identity)
    with torch.no_grad():
        y = torch.randn(2, 3, 5, 5)
        assert max_diff(fused(y), model(y)) < 1e-5


def test_fold_bn_refuses_training_mode_and_leaves_unfoldable_layers() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match=r"fold_bn needs a model in eval mode .* got model.training=True"):
        N.fold_bn(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match=r"every batch norm in eval mode; .* got training layers \['1'\]"):
        N.fold_bn(model)
    # a BN after a ReLU, a BN without running stats and a conv output used twice are not folded
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    fused = N.fold_bn(model)
    assert sum(N.is_batchnorm(m) for m in fused.modules()) == 2
    x = torch.randn(4, 2, 3, 3)
    assert max_diff(fused(x), model(x)) == 0.0


def test_fold_bn_with_frozen_and_caffe_layers() -> None:
    torch.manual_seed(0)
    caffe = N.CaffeBatchNorm(3)
    for _ in range(3):
        caffe(torch.randn(8, 3, 4, 4) + 2)
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(8, 3, 2, 2) * 3)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), caffe, nn.Conv2d(3, 3, 1), N.FrozenBatchNorm.from_batchnorm(bn.eval())).eval()
    fused = N.fold_bn(model)
    assert not any(isinstance(m, (N.CaffeBatchNorm, N.FrozenBatchNorm)) for m in fused.modules())
    x = torch.randn(4, 2, 3, 3)
    assert max_diff(fused(x), model(x)) < 1e-5


@pytest.mark.parametrize("param", ["weight_norm", "spectral_norm"])
def test_fold_bn_bakes_a_parametrized_weight_and_leaves_the_original_working(param: str) -> None:
    torch.manual_seed(0)
    wrap = getattr(nn.utils.parametrizations, param)
    model = nn.Sequential(wrap(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          wrap(nn.Linear(8 * 4 * 4, 5)), nn.BatchNorm1d(5))
    for _ in range(3):
        model(torch.randn(16, 3, 6, 6))
    model.eval()
    x = torch.randn(4, 3, 6, 6)
    ref = model(x).detach()
    fused = N.fold_bn(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert type(fused[0]) is nn.Conv2d and type(fused[4]) is nn.Linear  # plain layers, weight baked in
    assert max_diff(fused(x), ref) < 1e-5  # the parametrization's weight, not its raw parameter, was folded
    assert nn.utils.parametrize.is_parametrized(model[0], "weight") and max_diff(model(x), ref) == 0  # original intact


def test_fold_bn_refuses_the_deprecated_weight_norm_clearly() -> None:
    with pytest.warns(FutureWarning):
        conv = nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="parametrizations.weight_norm"):
        N.fold_bn(nn.Sequential(conv, nn.BatchNorm2d(4)).eval())


def test_frozen_layers_keep_the_models_mode_so_fold_bn_takes_them() -> None:
    model = _cnn(N.BatchNorm2d)
    model(torch.randn(8, 3, 5, 5))
    frozen = N.freeze_bn(model.eval())
    assert not any(m.training for m in frozen.modules())
    x = torch.randn(4, 3, 5, 5)
    assert max_diff(N.fold_bn(frozen)(x), model(x)) < 1e-5
    assert all(m.training for m in N.unfreeze_bn(N.freeze_bn(_cnn(N.BatchNorm2d).train())).modules())


# ----------------------------------------------------------------------------- freeze_bn / convert_norm


def test_freeze_bn_stays_frozen_after_train() -> None:
    model = _cnn(N.BatchNorm2d)
    model(torch.randn(8, 3, 5, 5))
    model.eval()
    x = torch.randn(4, 3, 5, 5)
    ref = model(x)
    frozen = N.freeze_bn(model)
    assert frozen is model
    frozen.train()
    frozen[7].eval()  # dropout off to compare
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in frozen.modules() if isinstance(m, N.FrozenBatchNorm)]
    assert len(stats) == 2
    y = frozen(x)
    frozen(torch.randn(8, 3, 5, 5) * 5)
    assert max_diff(y, ref) < 1e-6
    for (m0, v0), m in zip(stats, [m for m in frozen.modules() if isinstance(m, N.FrozenBatchNorm)]):
        assert torch.equal(m0, m.running_mean) and torch.equal(v0, m.running_var)
    names = [n for n, _ in frozen.named_parameters()]
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias"], f"BN affine must not be trainable: {names}"
    with pytest.raises(ValueError, match="freeze_bn needs running statistics; 0 .* track_running_stats=False"):
        N.freeze_bn(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))


def test_convert_norm_to_group_layer_renorm_and_none() -> None:
    model = _cnn(nn.BatchNorm2d)
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    model(torch.randn(8, 3, 5, 5))
    out = N.convert_norm(model, "group")
    assert out is model and isinstance(model[1], N.GroupNorm) and (model[1].num_groups, model[4].num_groups) == (4, 5)
    assert torch.all(model[1].weight == 2.0), "gamma must be carried over"
    assert model(torch.randn(2, 3, 5, 5)).shape == (2, 125)
    m2 = _cnn(N.BatchNorm2d)
    m2(torch.randn(8, 3, 5, 5) + 3)
    rm = m2[1].running_mean.clone()
    N.convert_norm(m2, "renorm", rmax=2.0)
    assert isinstance(m2[1], N.BatchRenorm2d) and torch.equal(m2[1].running_mean, rm)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    N.convert_norm(mlp, "layer")
    x = torch.randn(5, 3)
    assert max_diff(mlp(x), F.layer_norm(mlp[0](x), (4,))) < 1e-6
    assert N.convert_norm(mlp, "none") is mlp and isinstance(mlp[1], N.GroupNorm), "only batch norms are replaced"
    mlp = N.convert_norm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "none")
    assert isinstance(mlp[1], nn.Identity)
    bn = N.convert_norm(nn.BatchNorm2d(4).eval(), functools.partial(N.GroupNorm, num_groups=4))
    assert isinstance(bn, N.GroupNorm) and bn.num_groups == 4 and not bn.training
    # settings a target does not take are not forced on it
    src = nn.Sequential(nn.BatchNorm2d(3, eps=1e-3, momentum=None, affine=False))
    src(torch.randn(4, 3, 2, 2) + 2)
    caffe = N.convert_norm(src, "caffe")[0]
    assert isinstance(caffe, N.CaffeBatchNorm) and caffe.eps == 1e-3
    frozen = N.convert_norm(nn.Sequential(nn.BatchNorm1d(3, eps=0.01)), "frozen")[0]
    assert isinstance(frozen, N.FrozenBatchNorm) and frozen.eps == 0.01
    ghost = N.convert_norm(nn.Sequential(nn.BatchNorm2d(3, momentum=None, affine=False, track_running_stats=False)), N.GhostBatchNorm2d, virtual_batch_size=2)[0]
    assert (ghost.momentum, ghost.affine, ghost.track_running_stats, ghost.virtual_batch_size) == (None, False, False, 2)


# ----------------------------------------------------------------------------- bn_health


def _healthy_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), N.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Sigmoid())
    data = torch.randn(256, 6)
    N.precise_bn(model, data.split(64), num_batches=4)
    model.eval()
    return model


def test_bn_health_clean_model_and_json() -> None:
    model = _healthy_mlp()
    rep = N.bn_health(model, torch.randn(128, 6))
    assert rep.ok, rep.problems
    assert [lh.activation for lh in rep.layers] == ["relu", "sigmoid"]
    assert rep.graph_method == "fx"
    assert rep.layers[0].train_eval_gap is not None and rep.layers[0].train_eval_gap < 0.3
    assert 0.3 < rep.layers[0].saturated_fraction < 0.7, "about half of a ReLU is inactive"
    d = json.loads(rep.to_json())
    assert d["ok"] is True and d["layers"][1]["name"] == "4"
    text = N.format_bn_health(rep)
    assert "no problems found" in text and "relu" in text


def test_bn_health_detects_planted_problems_and_leaves_model_unchanged() -> None:
    model = _healthy_mlp()
    model.train()
    with torch.no_grad():
        model[1].weight[2] = 0.0  # dead channel
        model[1].running_var[5] = 1e-9  # collapsed variance
        model[4].running_mean[0] = float("nan")  # non-finite buffer
        model[4].running_mean[1:] += 50.0  # stale statistics: huge train/eval gap
        model[4].bias.fill_(10.0)  # sigmoid saturated
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    batch = (torch.randn(64, 6), torch.zeros(64))
    rng_before = torch.random.get_rng_state()
    rep = N.bn_health(model, batch)
    a, b = rep.layers
    assert a.dead_channels == [2] and a.collapsed_channels == [5]
    assert b.nonfinite == ["running_mean"]
    assert b.train_eval_gap is None or b.train_eval_gap > 0.5
    # 3 of 4 channels saturate; the NaN channel (NaN running mean) is not counted as saturated
    assert b.saturated_fraction == pytest.approx(0.75)
    assert not rep.ok and len(rep.problems) >= 4, rep.problems
    assert any("dead channel" in p for p in rep.problems) and any("saturated" in p for p in rep.problems)
    json.loads(rep.to_json())  # strict JSON even with NaN inside the model
    text = N.format_bn_health(rep)
    assert text.count("PROBLEM") == len(rep.problems)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]) or (torch.isnan(v).any() and torch.equal(v.nan_to_num(), sd[k].nan_to_num())), f"{k} changed by bn_health"
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_bn_health_stale_stats_gap() -> None:
    model = _healthy_mlp()
    with torch.no_grad():
        model[1].running_mean += 5.0
    rep = N.bn_health(model, torch.randn(64, 6))
    assert rep.layers[0].train_eval_gap > 0.5 and any("train-vs-eval gap" in p for p in rep.problems)
    assert rep.output_gap is not None and rep.output_gap > 0.05


# ----------------------------------------------------------------------------- Caffe / darknet


def test_caffe_round_trip() -> None:
    torch.manual_seed(0)
    caffe = N.CaffeBatchNorm(4)
    for i in range(5):
        caffe(torch.randn(6, 4, 3, 3) * (i + 1) + i)
    caffe.eval()
    gamma, beta = torch.rand(4) + 0.5, torch.randn(4)
    bn = N.from_caffe(caffe, gamma, beta)
    assert isinstance(bn, N.BatchNorm2d) and not bn.training and bn.momentum == pytest.approx(0.001)
    x = torch.randn(5, 4, 3, 3) * 3
    expected = caffe(x) * gamma.view(1, 4, 1, 1) + beta.view(1, 4, 1, 1)
    assert max_diff(bn(x), expected) < 1e-5
    layer, scale, bias = N.to_caffe_layer(bn)
    assert max_diff(layer(x) * scale.view(1, 4, 1, 1) + bias.view(1, 4, 1, 1), bn(x)) < 1e-5
    blobs = N.to_caffe(bn)
    bn2 = N.from_caffe({k: blobs[k] for k in ("mean", "variance", "scale_factor")}, blobs["scale"], blobs["bias"], eps=float(blobs["eps"]))
    assert max_diff(bn2(x), bn(x)) < 1e-5
    zero = N.from_caffe({"mean": np.ones(2), "variance": np.ones(2), "scale_factor": np.zeros(1)}, dims=0)
    assert torch.all(zero.running_mean == 0) and torch.all(zero.running_var == 0), "s == 0 means zero statistics"
    with pytest.raises(ValueError, match=r"missing \['scale_factor'\]"):
        N.from_caffe({"mean": np.ones(2), "variance": np.ones(2)})


def _darknet_forward(x: np.ndarray, b: np.ndarray, s: np.ndarray, m: np.ndarray, v: np.ndarray) -> np.ndarray:
    cs = (1, -1, 1, 1)
    return s.reshape(cs) * (x - m.reshape(cs)) / (np.sqrt(v.reshape(cs)) + 1e-6) + b.reshape(cs)


def test_darknet_eval_outputs_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    c = 5
    b, s, m = rng.normal(size=c), rng.uniform(0.5, 2, size=c), rng.normal(size=c)
    v = np.array([1.0, 4.0, 1e-9, 0.0, 1e-4])  # tiny and zero variances: the eps placement matters
    flat = np.concatenate([[7.0], b, s, m, v, [1.0, 2.0]]).astype(np.float32)
    blk, end = N.split_darknet_bn(flat, c, offset=1)
    assert end == 1 + 4 * c
    bn = N.from_darknet(blk["biases"], blk["scales"], blk["rolling_mean"], blk["rolling_variance"])
    assert bn.eps == 1e-12 and bn.momentum == 0.01
    x = rng.normal(size=(3, c, 2, 2)) * 1e-3 + m.reshape(1, c, 1, 1)
    ref = _darknet_forward(x, *(blk[k].double().numpy() for k in ("biases", "scales", "rolling_mean", "rolling_variance")))
    got = bn.double()(torch.from_numpy(x)).detach().numpy()
    rel = np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref)))
    assert rel < 1e-6, f"darknet eval outputs differ: {rel:.2e}"
    back = N.to_darknet(bn)
    for k in ("biases", "scales", "rolling_mean"):
        assert max_diff(back[k], blk[k]) < 1e-6, k
    assert np.max(np.abs(back["rolling_variance"].numpy() - v)) < 1e-6
    # torch's own eps convention gives visibly different outputs on the tiny-variance channels
    naive = nn.BatchNorm2d(c).double().eval()
    naive.running_var.copy_(torch.from_numpy(v))
    naive.running_mean.copy_(torch.from_numpy(m))
    assert max_diff(naive(torch.from_numpy(x))[:, 2:4], torch.from_numpy((ref - b.reshape(1, c, 1, 1)) / s.reshape(1, c, 1, 1))[:, 2:4]) > 1e-3
    with pytest.raises(ValueError, match="must have the same length, got 5, 5, 5, 4"):
        N.from_darknet(b, s, m, v[:4])
    with pytest.raises(ValueError, match="weights has 23 values, needs 40 for num_features=10 at offset=0"):
        N.split_darknet_bn(flat, 10)


# ----------------------------------------------------------------------------- registry


def test_registry_names_dims_and_errors() -> None:
    assert {"batch", "group", "layer", "instance", "none", "renorm", "ghost", "sync", "caffe"} <= set(N.known_norms())
    assert type(N.create_norm("batch", 4, dims=0)) is N.BatchNorm1d
    assert type(N.create_norm("batch", 4, dims=1)) is N.BatchNorm1d
    assert type(N.create_norm("BATCH", 4)) is N.BatchNorm2d
    assert type(N.create_norm("batch", 4, dims=3)) is N.BatchNorm3d
    assert type(N.create_norm("renorm", 4, dims=0)) is N.BatchRenorm1d
    assert type(N.create_norm("ghost", 4, virtual_batch_size=8)) is N.GhostBatchNorm2d
    assert type(N.create_norm("sync", 4)) is N.SyncBatchNorm
    assert type(N.create_norm("caffe", 4)) is N.CaffeBatchNorm
    assert type(N.create_norm(None, 4)) is nn.Identity and type(N.create_norm("none", 4, dims=0)) is nn.Identity
    assert N.create_norm("group", 12).num_groups == 6
    assert N.create_norm("group", 64, dims=1).num_groups == 8
    assert N.create_norm("group", 64, num_groups=32).num_groups == 32
    assert N.create_norm("group", 5).num_groups == 5
    with pytest.raises(ValueError, match=r"num_groups must be a positive divisor of num_channels \(10\), got 4"):
        N.create_norm("group", 10, num_groups=4)
    inst = N.create_norm("instance", 3, dims=1)
    assert type(inst) is N.InstanceNorm1d and inst.affine
    with pytest.raises(ValueError, match=r"needs spatial dimensions \(dims >= 1\), got dims=0"):
        N.create_norm("instance", 3, dims=0)
    with pytest.raises(ValueError, match=r"unknown norm 'bacth'; known norms: batch, batch_act, caffe, .*group.*"):
        N.create_norm("bacth", 3)
    with pytest.raises(ValueError, match=r"dims must be one of \[0, 1, 2, 3\], got 4"):
        N.create_norm("batch", 3, dims=4)
    with pytest.raises(TypeError, match="norm must be a name, a class or a callable, got int"):
        N.create_norm(3, 3)  # type: ignore[arg-type]
    assert type(N.create_norm(N.GroupNorm, 4, num_groups=2)) is N.GroupNorm
    assert N.create_norm(functools.partial(N.BatchNorm2d, eps=0.1), 4).eps == 0.1
    N.register_norm("test-custom", lambda c, dims=2, **kw: nn.Identity())
    assert "test-custom" in N.known_norms()
    with pytest.raises(ValueError, match="norm name 'test-custom' is already registered"):
        N.register_norm("test-custom", lambda c, **kw: nn.Identity())


def test_registry_layer_norms_over_channels_and_space_per_sample() -> None:
    x = torch.randn(3, 4, 5, 6) * 2 + 1
    ln = N.create_norm("layer", 4, dims=2)
    assert max_diff(ln(x), F.layer_norm(x, (4, 5, 6))) < 1e-5
    ln0 = N.create_norm("layer", 4, dims=0, affine=False)
    assert type(ln0) is N.LayerNorm and ln0.weight is None


def test_norm_imports_nothing_else_from_batchlab() -> None:
    import ast
    import pathlib
    import sys

    root = pathlib.Path(N.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            for mod in mods:
                top = mod.split(".")[0]
                # the standard library, torch, numpy and batchlab.norm itself: nothing else
                assert top in sys.stdlib_module_names or top in {"torch", "numpy"} or mod.startswith("batchlab.norm"), f"{path.name} imports {mod}"
                assert top != "numpy" or path.name == "reference.py", f"{path.name} imports numpy"


def test_bn_health_does_not_call_a_zero_initialized_residual_bn_dead() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.BatchNorm2d(4))
    nn.init.zeros_(model[4].weight)  # torchvision's zero_init_residual
    with torch.no_grad():
        model[1].weight[1] = 0.0  # one channel at 0 in an otherwise live layer: dead
    rep = N.bn_health(model, torch.randn(8, 3, 6, 6))
    by_name = {lh.name: lh for lh in rep.layers}
    assert by_name["4"].dead_channels == [] and not any("dead" in p for p in by_name["4"].problems)
    assert by_name["1"].dead_channels == [1]
    with torch.no_grad():  # a few steps after the zero init: most gammas still within 1e-3, all small
        model[4].weight.copy_(torch.tensor([2e-4, -5e-4, 8e-4, 0.02]))
    assert N.bn_health(model, torch.randn(8, 3, 6, 6)).layers[1].dead_channels == []
    with torch.no_grad():  # a trained layer (large gammas) that lost channels: those are dead
        model[4].weight.copy_(torch.tensor([2e-4, -5e-4, 8e-4, 0.9]))
    assert N.bn_health(model, torch.randn(8, 3, 6, 6)).layers[1].dead_channels == [0, 1, 2]


def test_bn_health_sees_through_torch_compile() -> None:
    model = _cnn(N.BatchNorm2d)
    model(torch.randn(8, 3, 5, 5) * 3 + 1)
    eager = N.bn_health(model, torch.randn(8, 3, 5, 5))
    compiled = N.bn_health(torch.compile(model, backend="eager"), torch.randn(8, 3, 5, 5))
    assert compiled.graph_method == eager.graph_method and len(compiled.layers) == len(eager.layers) == 2
    assert all(lh.train_eval_gap is not None for lh in compiled.layers)  # measured, not "-"


def _trained_bn(c: int = 4) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn.eval()


def test_convert_norm_to_frozen_and_caffe_carries_the_statistics_or_refuses() -> None:
    import copy

    bn = _trained_bn()
    x = torch.randn(2, 4, 5, 5)
    for kind in ("frozen", "caffe"):
        new = N.convert_norm(nn.Sequential(copy.deepcopy(bn)), kind)
        assert (new(x) - bn(x)).abs().max().item() < 1e-6, kind
    with torch.no_grad():
        bn.weight.fill_(2.0)
    assert (N.convert_norm(nn.Sequential(copy.deepcopy(bn)), "frozen")(x) - bn(x)).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="no affine.*to_caffe_layer"):  # gamma/beta would be dropped
        N.convert_norm(nn.Sequential(copy.deepcopy(bn)), "caffe")
    for kind in ("frozen", "caffe"):  # batch statistics in eval: nothing to freeze
        with pytest.raises(ValueError, match="running statistics"):
            N.convert_norm(nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)), kind)


def test_convert_norm_to_a_norm_act_layer_needs_the_activation_said() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    with pytest.raises(ValueError, match="act_layer="):
        N.convert_norm(model, "batch_act")
    assert isinstance(model[1], nn.BatchNorm2d)  # nothing converted
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    before = model(x)
    N.convert_norm(model, "batch_act", act_layer=None)
    assert torch.equal(model(x), before)


def test_convert_and_freeze_refuse_an_uninitialized_lazy_norm_clearly() -> None:
    for fn in (lambda m: N.convert_norm(m, "group"), N.freeze_bn):
        with pytest.raises(ValueError, match="lazy module not initialized"):
            fn(nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d()))


def test_convert_norm_to_layer_keeps_bias_false() -> None:
    ln = N.convert_norm(nn.Sequential(nn.LayerNorm(8, bias=False)), "layer",
                        predicate=lambda m: isinstance(m, nn.LayerNorm))
    assert ln[0].bias is None
    gn = N.convert_norm(nn.Sequential(nn.BatchNorm2d(8, bias=False)), "layer")
    assert gn[0].bias is None


def test_fold_bn_leaves_a_tied_weight_and_checks_linear_folds_on_the_example() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.bn, self.c2 = nn.Conv2d(3, 3, 3, padding=1), _trained_bn(3), nn.Conv2d(3, 3, 3, padding=1)
            self.c2.weight = self.c1.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c2(self.bn(self.c1(x)))

    t = Tied().eval()
    x = torch.randn(2, 3, 6, 6)
    assert (N.fold_bn(t)(x) - t(x)).abs().max().item() < 1e-6
    # Linear -> BatchNorm1d on (N, L, F) with L == F: BN normalizes L, not the Linear's features
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
    m(torch.randn(64, 16, 8))
    m.eval()
    x = torch.randn(2, 16, 8)
    folded = N.fold_bn(m, x)
    assert isinstance(folded[1], nn.BatchNorm1d) and torch.allclose(folded(x), m(x))
    x2 = torch.randn(5, 8)  # the usual (N, F) case still folds with an example
    assert isinstance(N.fold_bn(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16)).eval(), x2)[1], nn.Identity)


def test_bn_health_sees_an_activation_module_called_twice_and_hardswish() -> None:
    class Block(nn.Module):  # torchvision BasicBlock style: one self.relu used twice
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + x)

    b = Block()
    with torch.no_grad():
        b.bn1.bias.fill_(-20.0)  # every unit after bn1 is dead
    rep = {layer.name: layer for layer in N.bn_health(b, torch.randn(8, 4, 6, 6)).layers}
    assert any("saturated after BN (relu" in p for p in rep["bn1"].problems)
    hs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Hardswish())
    with torch.no_grad():
        hs[1].bias.fill_(-10.0)
    rep = N.bn_health(hs, torch.randn(8, 3, 6, 6)).layers[0]
    assert any("hardswish: y <= -3" in p for p in rep.problems)


def test_convert_norm_warns_when_a_trained_model_gets_another_normalization() -> None:
    import warnings

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model(torch.randn(4, 3, 8, 8))  # one training batch: its statistics are trained
    with pytest.warns(UserWarning, match=r"1 trained batch norm\(s\) \(1\) replaced by 'group'.*outputs change"):
        N.convert_norm(model, "group")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same statistics, same outputs: no warning
        trained = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        trained(torch.randn(4, 3, 8, 8))
        N.convert_norm(trained, "ghost")
        N.convert_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "group")  # fresh: nothing to lose


def test_conversions_keep_the_parameter_objects_an_optimizer_holds() -> None:
    # as torch's convert_sync_batchnorm: an optimizer built before the conversion goes on training them
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    held = {id(p) for p in torch.optim.SGD(m.parameters(), lr=0.1).param_groups[0]["params"]}
    m = N.convert_sync_batchnorm(m)
    assert {id(p) for p in m.parameters()} == held
    m = N.convert_norm(m, "group", num_groups=2)
    assert isinstance(m[1], nn.GroupNorm) and {id(p) for p in m.parameters()} == held
    m = N.convert_norm(nn.Sequential(nn.BatchNorm2d(4)).double(), "ghost", virtual_batch_size=2)
    assert m[0].weight.dtype == torch.float64


def test_convert_norm_is_all_or_nothing_and_converts_a_shared_layer_once() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                      nn.BatchNorm2d(4, track_running_stats=False))
    kinds = [type(x) for x in m]
    with pytest.raises(ValueError, match="needs a batch norm with running statistics"):
        N.convert_norm(m, "frozen")
    assert [type(x) for x in m] == kinds  # the first BN was not replaced before the second one raised
    with pytest.raises(ValueError, match="freeze_bn needs running statistics"):
        N.freeze_bn(m)
    assert [type(x) for x in m] == kinds
    shared = nn.BatchNorm2d(4)
    m = N.convert_norm(nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Conv2d(4, 4, 1), shared), "group", num_groups=2)
    assert isinstance(m[3], nn.GroupNorm) and m[1] is m[3]  # both places, one layer, as before


def test_numpy_integers_are_channel_counts_as_torch_takes_them() -> None:
    bn = N.BatchNorm2d(np.int64(8))
    assert bn(torch.randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)
    m = N.convert_norm(nn.Sequential(nn.BatchNorm2d(np.int64(8))), "ghost", virtual_batch_size=2)
    assert m[0](torch.randn(4, 8, 2, 2)).shape == (4, 8, 2, 2)


def test_a_norm_class_of_the_users_own_is_refused_with_what_convert_norm_does() -> None:
    class OwnLayerNorm(nn.Module):  # nanoGPT's LayerNorm with an optional bias
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

    m = nn.Sequential(nn.Linear(4, 4), OwnLayerNorm(4))
    with pytest.raises(ValueError, match=r"replaces batch norms .* and nn.LayerNorm / nn.RMSNorm .*norm\.replace_modules"):
        N.convert_norm(m, "rms", predicate=lambda x: isinstance(x, OwnLayerNorm))


def test_bn_health_on_a_model_without_batch_norm_says_so() -> None:
    with pytest.warns(UserWarning, match="has no batch-norm layer, so there is nothing to check"):
        report = N.bn_health(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), torch.randn(8, 4))
    assert not report.layers


def test_fold_bn_warns_that_an_unchecked_linear_fold_assumes_n_f_inputs() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x))

    m = Seq()
    m(torch.randn(16, 6, 6) * 3 + 1)
    m.eval()
    x = torch.randn(4, 6, 6)  # (N, L, F) with L == F: BatchNorm1d normalizes L, not the Linear's outputs
    with pytest.warns(UserWarning, match="assuming \\(N, F\\) inputs"):
        fold = N.fold_bn(m)
    assert float((fold(x) - m(x)).abs().max()) > 1e-3  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checked = N.fold_bn(m, example_input=x)
    assert torch.allclose(checked(x), m(x))


def test_bn_health_says_when_a_batch_of_one_left_the_gap_unmeasured() -> None:
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    text = N.format_bn_health(N.bn_health(m, torch.randn(1, 4)))
    assert "train-vs-eval gap NOT MEASURED (batch size 1" in text and "no problems found among the checks that ran" in text
    assert "NOT MEASURED" not in N.format_bn_health(N.bn_health(m, torch.randn(8, 4)))


@pytest.mark.parametrize("to", ["batch", "ghost", "sync"])
def test_a_bn_whose_tracking_was_switched_off_after_construction_keeps_its_eval_outputs(to: str) -> None:
    # torch's layer keeps its buffers and normalizes with them in eval mode; the converted one did not
    torch.manual_seed(0)
    m = nn.BatchNorm2d(3)
    for _ in range(3):
        m(torch.randn(4, 3, 5, 5) * 2 + 1)
    m.track_running_stats = False
    m.eval()
    x = torch.randn(2, 3, 5, 5)
    want = m(x)
    c = N.convert_norm(nn.Sequential(m), to, **({"virtual_batch_size": 2} if to == "ghost" else {}))
    assert torch.allclose(c(x), want) and c[0].track_running_stats is False and c[0].running_mean is not None
    s = N.convert_sync_batchnorm(nn.Sequential(m))
    assert torch.allclose(s(x), want)


def test_ghost_bn_without_running_statistics_evaluates_over_the_whole_batch() -> None:
    g = N.GhostBatchNorm2d(4, virtual_batch_size=3, track_running_stats=False).eval()
    x = torch.randn(8, 4, 3, 3)
    assert torch.allclose(g(x), nn.BatchNorm2d(4, track_running_stats=False).eval()(x), atol=1e-6)


def test_precise_bn_of_bfloat16_activations_pools_the_statistics_unrounded() -> None:
    # under autocast a BN sees bf16 activations; their per-batch statistics used to be rounded to bf16
    # before the float64 pooling (a relative error of ~1e-3 instead of ~1e-7)
    torch.manual_seed(0)
    data = [(torch.randn(8, 3, 6, 6) * 3 + 7).bfloat16() for _ in range(4)]
    bn = nn.Sequential(nn.BatchNorm2d(3))
    N.precise_bn(bn, data, 4)
    x = torch.cat(data).double()
    want_mean, want_var = x.mean((0, 2, 3)), x.var((0, 2, 3), correction=1)
    assert bn[0].running_mean.dtype == torch.float32
    assert torch.allclose(bn[0].running_mean.double(), want_mean, rtol=1e-5)
    assert torch.allclose(bn[0].running_var.double(), want_var, rtol=1e-4)


def test_fold_bn_keeps_a_frozen_model_frozen() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    m.requires_grad_(False)
    folded = N.fold_bn(m)
    assert not any(p.requires_grad for p in folded.parameters())  # the new conv bias too, as torch's fuse does


def test_bn_health_judges_a_norm_act_layers_own_activation_before_it() -> None:
    # BatchNormAct2d(act_layer="relu") with bias -6: every output is 0, yet the layer was reported with
    # activation None, rule "|y| > 3", 0% saturated (the hook saw the output after its ReLU)
    import batchlab.norm as N

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), N.BatchNormAct2d(8, act_layer="relu"), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        m[1].bias.fill_(-6.0)
    m.train()(torch.randn(16, 3, 10, 10))
    layer = N.bn_health(m, torch.randn(16, 3, 10, 10)).layers[0]
    assert layer.activation == "relu" and layer.saturated_fraction == pytest.approx(1.0)
    assert any("saturated" in p for p in layer.problems)
    sig = nn.Sequential(nn.Conv2d(3, 8, 3), N.BatchNormAct2d(8, act_layer="sigmoid"))
    with torch.no_grad():
        sig[1].bias.fill_(9.0)  # sigmoid's input |y| > 4 everywhere: judged before the activation
    sig.train()(torch.randn(16, 3, 10, 10))
    layer = N.bn_health(sig, torch.randn(16, 3, 10, 10)).layers[0]
    assert layer.activation == "sigmoid" and layer.saturated_fraction == pytest.approx(1.0)


def test_a_zero_initialized_bn_a_few_steps_into_training_has_no_dead_channels() -> None:
    # layer2.0.bn2 of a zero-init ResNet after 8 steps: max |gamma| 0.0048, 44% at or below 1e-3;
    # "7 dead channels" was reported
    import batchlab.norm as N

    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16))
    with torch.no_grad():
        m[1].weight.copy_(torch.linspace(0.0, 0.0048, 16))
    m.train()(torch.randn(8, 3, 6, 6))
    assert N.bn_health(m, torch.randn(8, 3, 6, 6)).layers[0].dead_channels == []
    with torch.no_grad():  # a trained layer with some channels gone is still flagged
        m[1].weight.copy_(torch.cat([torch.zeros(3), torch.ones(13)]))
    assert N.bn_health(m, torch.randn(8, 3, 6, 6)).layers[0].dead_channels == [0, 1, 2]


@pytest.mark.parametrize("groups", [1, 2])
def test_fold_bn_folds_a_transposed_convolution(groups: int) -> None:
    # a U-Net's ConvTranspose2d + BN was left unfolded; its weight holds the output channels in dim 1
    import batchlab.norm as N

    torch.manual_seed(0)
    m = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups, bias=groups == 1), nn.BatchNorm2d(6),
                      nn.ReLU()).double()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].weight.uniform_(0.5, 2)
        m[1].bias.uniform_(-1, 1)
    m.eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.double)
    folded = N.fold_bn(m, example_input=x)
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), m(x), rtol=0, atol=1e-12)
