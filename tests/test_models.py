"""Models: shapes for every norm x activation, bias rules, parameter counts, a few training steps."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from batchlab.models import CNN1d, CNN2d, MLP, ResNet, SequenceNet, count_parameters, resnet8, resnet20

NORMS = ["batch", "group", "layer", "instance", "none"]
ACTS = ["relu", "sigmoid", "tanh"]
TOKEN_NORMS = ["batch", "group", "layer", "none"]  # per-token norms (dims=0): no "instance"


def seq_input(n: int = 4, length: int = 7, dim: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 3, 5, 1][:n])
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).float()
    feats = torch.randn(n, length, dim, generator=g) * mask.unsqueeze(-1)
    return torch.cat([feats, mask.unsqueeze(-1)], dim=-1)


CASES: dict[str, tuple[Callable[..., nn.Module], Callable[[], torch.Tensor], int, list[str]]] = {
    "mlp": (functools.partial(MLP, 64, (32, 32), 10), lambda: torch.randn(6, 1, 8, 8), 10, TOKEN_NORMS),
    "cnn1d": (functools.partial(CNN1d, 1, 10, (8, 8), input_length=40), lambda: torch.randn(6, 1, 40), 10, NORMS),
    "cnn2d": (functools.partial(CNN2d, 1, 10, (8, 16), input_size=8), lambda: torch.randn(6, 1, 8, 8), 10, NORMS),
    "resnet8": (functools.partial(resnet8, 10), lambda: torch.randn(2, 3, 32, 32), 10, NORMS),
    "sequence": (functools.partial(SequenceNet, 5, 3, width=16), seq_input, 3, TOKEN_NORMS),
}


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", list(CASES))
def test_output_shape_every_norm_and_activation(name: str, norm: str, activation: str) -> None:
    make, make_x, classes, norms = CASES[name]
    if norm not in norms:
        with pytest.raises(ValueError, match=r"instance.* needs spatial dimensions"):
            make(norm=norm, activation=activation)
        return
    torch.manual_seed(0)
    model = make(norm=norm, activation=activation)
    x = make_x()
    out = model(x)
    assert out.shape == (x.shape[0], classes)
    assert torch.isfinite(out).all()
    model.eval()
    assert model(x).shape == (x.shape[0], classes)


@pytest.mark.parametrize("name", list(CASES))
def test_unknown_activation_lists_allowed(name: str) -> None:
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'; allowed: relu, sigmoid, tanh"):
        CASES[name][0](norm="batch", activation="gelu")


def test_unknown_norm_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown norm 'weird'; known norms: batch"):
        MLP(4, (8,), 2, norm="weird")
    with pytest.raises(ValueError, match=r"norm_position must be one of before, after; got 'middle'"):
        MLP(4, (8,), 2, norm_position="middle")
    with pytest.raises(ValueError, match=r"depth must be 6n \+ 2 with n >= 1 .* got 10"):
        ResNet(10)
    with pytest.raises(ValueError, match=r"SequenceNet expects x of shape \(N, L, 6\).*got \(2, 3, 5\)"):
        SequenceNet(5, 2)(torch.randn(2, 3, 5))


def test_bias_only_without_norm() -> None:
    with_bn = MLP(8, (16, 16), 3, norm="batch")
    linears = [m for m in with_bn if isinstance(m, nn.Linear)]
    assert [m.bias is None for m in linears] == [True, True, False]
    plain = MLP(8, (16, 16), 3, norm="none")
    assert all(m.bias is not None for m in plain if isinstance(m, nn.Linear))
    after = MLP(8, (16,), 3, norm="batch", norm_position="after")
    assert isinstance(after[1], nn.Linear) and after[1].bias is not None
    assert isinstance(after[2], nn.ReLU) and type(after[3]).__name__ == "BatchNorm1d"
    convs = [m for m in resnet8(norm="group").modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)
    convs = [m for m in CNN2d(norm="none").modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)


def test_mlp_is_flat_sequential_linear_norm_act() -> None:
    m = MLP(64, (100, 100, 100), 10, norm="batch")
    kinds = [type(x).__name__ for x in m]
    assert kinds == ["Flatten"] + ["Linear", "BatchNorm1d", "ReLU"] * 3 + ["Linear"]


def test_norm_as_class_or_partial() -> None:
    m = CNN2d(norm=lambda c: nn.GroupNorm(4, c))
    assert sum(isinstance(x, nn.GroupNorm) for x in m.modules()) == 2
    m = MLP(8, (16,), 2, norm=nn.LayerNorm)
    assert isinstance(m[2], nn.LayerNorm) and m[1].bias is None


def test_parameter_counts() -> None:
    assert count_parameters(MLP(64, (100, 100, 100), 10, norm="none")) == 64 * 100 + 100 + 2 * (100 * 100 + 100) + 1010
    assert count_parameters(MLP(64, (100, 100, 100), 10, norm="batch")) == 64 * 100 + 2 * 100 * 100 + 6 * 100 + 1010
    assert 70_000 < count_parameters(resnet8()) < 90_000
    assert 260_000 < count_parameters(resnet20()) < 280_000  # the paper's 0.27M
    assert count_parameters(CNN2d()) < 10_000
    assert count_parameters(CNN1d()) < 20_000
    assert count_parameters(SequenceNet(8, 4)) < 25_000


def test_resnet_depths() -> None:
    def blocks(m: nn.Module) -> int:
        return sum(1 for x in m.modules() if type(x).__name__ == "BasicBlock")

    assert blocks(resnet8()) == 3 and blocks(resnet20()) == 9 and blocks(ResNet(14)) == 6


@pytest.mark.parametrize("name", list(CASES))
def test_trains_a_few_steps_without_nan(name: str) -> None:
    make, make_x, classes, _ = CASES[name]
    torch.manual_seed(0)
    model = make(norm="batch", activation="relu")
    x = make_x()
    y = torch.arange(x.shape[0]) % classes
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_sequence_padding_does_not_change_output_with_masked_norm() -> None:
    """Extra padding changes nothing with per-token LayerNorm or masked BatchNorm."""
    x = seq_input()
    padded = torch.cat([x, torch.zeros(x.shape[0], 4, x.shape[2])], dim=1)
    for norm, masked in (("layer", False), ("batch", True)):
        torch.manual_seed(0)
        m = SequenceNet(5, 3, width=16, norm=norm, masked_norm=masked)
        assert torch.allclose(m(x), m(padded), atol=1e-5)
    torch.manual_seed(0)
    naive = SequenceNet(5, 3, width=16, norm="batch", masked_norm=False)
    assert not torch.allclose(naive(x), naive(padded), atol=1e-5)  # padding leaks into BN statistics
