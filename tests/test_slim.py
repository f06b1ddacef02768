"""Network slimming: selection, structural pruning, sparsity training, C21's decision rule, CLI errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from batchlab.cli import main
from batchlab.experiments.slimming import Slimming
from batchlab.norm import BatchNorm2d, create_norm
from batchlab.slim import (
    SparsityCallback,
    add_l1_subgradient,
    bn_layers,
    count_macs,
    count_params,
    select_channels,
    slim,
    sparsity_callback,
)
from batchlab.train import TrainConfig, fit


def small_cnn(bn: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1, bias=False), bn(12), nn.ReLU(),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 10),
    )


def randomize_bn(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in bn_layers(model):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.1)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, BatchNorm2d], ids=["torch-bn", "batchlab-bn"])
def test_pruned_model_is_smaller_with_the_same_output_shape(bn: type[nn.Module]) -> None:
    model = small_cnn(bn)
    randomize_bn(model)
    res = slim(model, X[:2], prune=0.5)
    assert res.channels_before == {"1": 8, "5": 12}
    assert sum(res.channels_after.values()) == 10
    assert res.removed_fraction == pytest.approx(0.5)
    assert res.model(X).shape == model(X).shape == (4, 10)
    assert count_params(res.model) < count_params(model)
    assert count_macs(res.model, X) < count_macs(model, X)
    assert res.model[0].out_channels == res.channels_after["1"] and res.model[4].in_channels == res.channels_after["1"]
    assert res.model[8].in_features == res.channels_after["5"] * 16
    assert sum(m.num_features for _, m in bn_layers(model)) == 20  # the original is left untouched


def test_pruning_dead_channels_leaves_outputs_unchanged() -> None:
    model = small_cnn()
    randomize_bn(model)
    dead = {"1": [0, 3, 5], "5": [1, 2, 7, 11]}
    with torch.no_grad():
        for name, idx in dead.items():
            bn = model.get_submodule(name)
            bn.weight[idx] = 0.0
            bn.bias[idx] = 0.0  # BN output 0, ReLU(0) = 0: the channel contributes nothing
    model.eval()
    res = slim(model, X[:2], prune=7 / 20)
    assert res.channels_after == {"1": 5, "5": 8}
    pruned = res.model.eval()
    x = torch.randn(32, 1, 8, 8)
    diff = (pruned(x) - model(x)).abs().max().item()
    assert diff < 1e-5, f"largest output difference {diff:.3g}"


def test_global_threshold_picks_exactly_the_right_count() -> None:
    gammas = [torch.tensor([0.5, -0.1, 0.9, 0.3]), torch.tensor([0.05, 0.7, -0.2, 0.8, 0.6, 0.4])]
    masks, threshold, notes = select_channels(gammas, 0.3)  # 3 of 10: |g| 0.05, 0.1, 0.2
    assert masks[0].tolist() == [False, True, False, False]
    assert masks[1].tolist() == [True, False, True, False, False, False]
    assert threshold == pytest.approx(0.2) and notes == []
    # Ties: every gamma equal; a stable sort still chooses exactly round(0.3 * 10) = 3.
    masks, _, _ = select_channels([torch.ones(4), torch.ones(6)], 0.3)
    assert sum(int(m.sum()) for m in masks) == 3


def test_keep_one_channel_per_layer() -> None:
    masks, _, notes = select_channels([torch.tensor([0.01, 0.02, 0.03]), torch.tensor([1.0, 2.0, 3.0, 4.0])], 0.4)
    assert masks[0].tolist() == [True, True, False] and len(notes) == 1 and "kept 1" in notes[0]
    model = small_cnn()
    randomize_bn(model)
    with torch.no_grad():
        model[1].weight.mul_(1e-3)  # the whole first layer is below every gamma of the second
    with pytest.warns(UserWarning, match=r"1 would lose all 8 channels"):
        res = slim(model, X[:2], prune=0.5)
    assert res.channels_after["1"] == 1 and res.model(X).shape == (4, 10)
    assert res.channels_after["5"] == 10  # 8 + 2 selected, one of layer 1's given back: 9 of 20 removed
    assert res.removed_fraction == pytest.approx(9 / 20) and any("kept 1" in n for n in res.notes)


@pytest.mark.parametrize("prune", [0, 1, 1.5, -0.1, float("nan"), True])
def test_bad_prune_ratio(prune: float) -> None:
    with pytest.raises(ValueError, match=r"prune must be a fraction .* strictly between 0 and 1, got"):
        slim(small_cnn(), X[:2], prune=prune)


def test_a_parametrized_weight_is_refused_by_name_before_any_pruning() -> None:
    model = small_cnn()
    conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    nn.utils.parametrizations.weight_norm(model.get_submodule(conv))
    with pytest.raises(ValueError, match=rf"parametrized weight .* has {conv}: remove the parametrization"):
        slim(model, X[:2], prune=0.5)


def test_model_without_bn_and_bad_lambda() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    with pytest.raises(ValueError, match=r"no BatchNorm layer .* Sequential cannot be slimmed"):
        slim(model, X[:2], prune=0.5)
    with pytest.raises(ValueError, match=r"sparsity .* >= 0, got -1"):
        sparsity_callback(-1)


def test_sparsity_callback_drives_gammas_down(toy_task) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(epochs=4, batch_size=32, seed=0, eval_train=False)
    plain, sparse = toy_task.make_model(), toy_task.make_model()
    sparse.load_state_dict(plain.state_dict())
    fit(toy_task, cfg, model=plain)
    r = fit(toy_task, cfg, model=sparse, callbacks=[SparsityCallback(0.05)])
    g_plain = torch.cat([m.weight.detach().abs() for _, m in bn_layers(plain)])
    g_sparse = torch.cat([m.weight.detach().abs() for _, m in bn_layers(sparse)])
    assert g_sparse.mean() < 0.6 * g_plain.mean(), (g_sparse.mean(), g_plain.mean())
    assert "l1_gamma" in r.history[-1]
    with pytest.raises(ValueError, match="needs BN layers"):
        nobn = nn.Sequential(nn.Linear(8, 3))
        fit(toy_task, cfg, model=nobn, callbacks=[SparsityCallback(0.01)])


def test_1d_model_with_batchlab_bn_prunes_through_flatten() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10, bias=False), create_norm("batch", 10, dims=0), nn.ReLU(), nn.Linear(10, 3))
    randomize_bn(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = slim(model, torch.randn(2, 6), prune=0.3)
    assert res.model[0].out_features == 7 and res.model[3].in_features == 7


# --- C21's decision rule on data built to be true, false, too noisy or invalid ------------------------------------

SPARSE = [0.001] * 30 + [0.8] * 18  # 30 of 48 channels below 10% of the largest |gamma|
DENSE = [0.9 + 0.01 * i for i in range(48)]  # no sparsity formed


def _data(drops: list[float], baseline: list[float], removed: float = 0.5, gammas: list[float] = SPARSE) -> dict:
    seeds = {}
    for i, (d, b) in enumerate(zip(drops, baseline)):
        seeds[str(i)] = {"slim": {"removed_fraction": removed}, "baseline": {"val_acc": b / 100},
                         "after": {"val_acc": (b - d) / 100, "params": 500, "macs": 100},
                         "before": {"params": 2000, "macs": 400}, "gammas_sparse": gammas}
    return {"lambda": 1e-3, "n_val": 360, "seeds": seeds,
            "sweep_heldout_acc": {"0.0001": {"0": 0.9, "1": 0.91}, "0.001": {"0": 0.95, "1": 0.94}}}


@pytest.mark.parametrize(("drops", "baseline", "removed", "gammas", "verdict"), [
    ([0.3, -0.2, 0.8], [97.0, 97.5, 96.8], 0.5, SPARSE, "supported"),
    ([4.0, 5.5, 6.0], [97.0, 97.2, 96.9], 0.5, SPARSE, "refuted"),
    ([0.2, 3.5, -1.0], [97.0, 94.0, 98.0], 0.5, SPARSE, "inconclusive"),  # seeds disagree
    ([1.5, 2.0, 1.8], [90.0, 97.0, 99.0], 0.5, SPARSE, "inconclusive"),  # over 1 point, but within the seed spread
    ([0.1, 0.2, 0.0], [97.0, 97.0, 97.0], 0.45, SPARSE, "invalid"),  # not half the channels
    ([4.0, 5.5, 6.0], [97.0, 97.2, 96.9], 0.5, DENSE, "invalid"),  # no sparsity formed: never 'refuted'
])
def test_c21_decide(drops: list[float], baseline: list[float], removed: float, gammas: list[float],
                    verdict: str) -> None:
    exp = Slimming()
    params = exp.params(quick=True)
    (v,) = exp.decide(_data(drops, baseline, removed, gammas), params)
    got = "invalid" if not v.valid else v.verdict
    assert v.claim == "C21" and got == verdict, v.reason
    assert v.effect["drop_points"]["n"] == 3
    assert "lambda 0.001 chosen on the held-out split" in v.reason


def test_c21_figure_shows_the_lambda_sweep() -> None:
    from tests.helpers.figures import check_figures

    d = _data([0.3, -0.2, 0.8], [97.0, 97.5, 96.8])
    for r in d["seeds"].values():
        r.update({"gammas_baseline": [1.0] * 48, "sparsity": 1e-3, "pruned_acc_before_finetune": 0.9,
                  "slim": {"removed_fraction": 0.5, "threshold": 0.01, "channels_before": {"bn1": 16, "bn2": 32},
                           "channels_after": {"bn1": 8, "bn2": 16}}})
        r["before"]["val_acc"] = 0.95
    figs = Slimming().plot(d, Slimming().params(True))
    assert "Lambda sweep" in figs[0].axes[3].get_title()
    check_figures(figs)


def test_c21_lambda_is_chosen_on_a_held_out_split():
    from batchlab.tasks import get_task

    assert Slimming.choose_lambda({"0.0001": {"0": 0.9, "1": 0.91}, "0.001": {"0": 0.95, "1": 0.94},
                                   "0.01": {"0": 0.6, "1": 0.5}}) == 1e-3
    assert Slimming.choose_lambda({"0.0001": {"0": 0.9}, "0.001": {"0": 0.9}}) == 1e-3  # a tie: the larger
    task = get_task("digits-cnn")
    h = Slimming.heldout_task(task, 0.2, seed=0)
    assert len(h.val_set) == round(0.2 * len(task.train_set)) and len(h.train_set) + len(h.val_set) == len(task.train_set)
    # the two parts are exactly the training set, re-split: no validation image is used to choose lambda
    both = torch.cat([h.train_set.x, h.val_set.x]).flatten(1)
    assert torch.allclose(both.double().sum(0), task.train_set.x.flatten(1).double().sum(0))
    assert torch.equal(torch.cat([h.train_set.y, h.val_set.y]).sort().values, task.train_set.y.sort().values)
    assert torch.equal(Slimming.heldout_task(task, 0.2, seed=0).val_set.x, h.val_set.x)  # fixed per seed
    assert not torch.equal(Slimming.heldout_task(task, 0.2, seed=1).val_set.x, h.val_set.x)


# --- CLI ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--prune", "1.0"], "--prune: must be a fraction strictly between 0 and 1, got '1.0'"),
    (["--prune", "0"], "--prune: must be a fraction strictly between 0 and 1, got '0'"),
    (["--prune", "abc"], "--prune: must be a fraction"),
    (["--sparsity=-1e-4"], "--sparsity: must be a finite number >= 0, got '-1e-4'"),
    (["--finetune-epochs", "-1"], "--finetune-epochs: must be a finite number >= 0"),
    (["--epochs", "0"], "--epochs: must be a positive"),
])
def test_cli_bad_inputs_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["slim", "--task", "digits-cnn", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def nobn_task():  # type: ignore[no-untyped-def]
    """Entry point for the CLI test: the toy task with its norm layer removed."""
    from conftest import make_toy_task

    task = make_toy_task()
    fn = task.model_fn
    task.model_fn = lambda norm=None, activation="relu": fn(norm="none", activation=activation)
    return task


def test_cli_model_without_bn_and_unknown_task_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["slim", "--task", "test_slim:nobn_task"])
    assert rc == 2 and "no BatchNorm layer" in capsys.readouterr().err
    rc = main(["slim", "--task", "no-such-task"])
    assert rc == 2 and "--task 'no-such-task'" in capsys.readouterr().err
    rc = main(["slim", "--task", "digits-cnn", "--batch-size", "100000"])
    assert rc == 2 and "--batch-size 100000 is larger" in capsys.readouterr().err


def test_cli_slim_end_to_end(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    import json

    rc = main(["slim", "--task", "digits-cnn", "--epochs", "1", "--finetune-epochs", "1", "--no-baseline",
               "--repeats", "3", "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["channels_removed"] == pytest.approx(0.5)
    assert out["params"][1] < out["params"][0] and out["flops"][1] < out["flops"][0]
    assert (tmp_path / "index.html").is_file() and (tmp_path / "gamma_hist.png").is_file()
    assert (tmp_path / "result.json").is_file() and abs(out["fold_max_diff"]) < 1e-4


class _Block(nn.Module):
    """torchvision's BasicBlock without a downsample: out = relu(bn2(conv2(relu(bn1(conv1(x))))) + x)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class _ResNetStage(nn.Module):
    """A stem and a stage of two blocks: bn1, layer.0.bn2 and layer.1.bn2 are coupled by the residual sums."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.layer = nn.Sequential(_Block(c), _Block(c))
        self.fc = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_a_channel_every_coupled_bn_selected_is_removed_from_a_stage_of_two_blocks() -> None:
    # channel 2 is selected in all three coupled BNs, 5 and 6 in only some of them: 2 goes, 5 and 6 stay
    # (the check used to compare each coupled BN with the list already narrowed by the one before, call the
    # plain identity coupling "non-identity" and keep everything)
    torch.manual_seed(0)
    m = _ResNetStage().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.layer[0].bn1, m.layer[0].bn2, m.layer[1].bn1, m.layer[1].bn2):
            bn.weight.uniform_(0.5, 1.5)
        for bn, chans in ((m.bn1, [2, 5]), (m.layer[0].bn2, [2, 6]), (m.layer[1].bn2, [2, 5])):
            bn.weight[chans] = 0.0
    total = sum(b.num_features for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = slim(m, torch.randn(2, 3, 8, 8), prune=6 / total)
    assert r.channels_after["bn1"] == r.channels_after["layer.0.bn2"] == r.channels_after["layer.1.bn2"] == 7
    assert not any("non-identity" in str(w.message) for w in caught)
    assert r.model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_zero_initialized_residual_bns_do_not_use_up_the_budget() -> None:
    # torchvision's zero_init_residual: every block's bn2 starts at gamma 0. Ranked channel by channel,
    # their channels took the whole budget, the stem's BN (coupled through the sums, gammas ~1) did not
    # select them, so they were kept: nothing at all was removed
    torch.manual_seed(0)
    m = _ResNetStage().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.layer[0].bn1, m.layer[1].bn1):
            bn.weight.uniform_(0.1, 1.5)
        for block in m.layer:
            block.bn2.weight.zero_()
    r = slim(m, torch.randn(2, 3, 8, 8), prune=0.3)
    assert r.removed_fraction == pytest.approx(0.3, abs=0.05)
    assert r.model(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    # the coupled channels went together or not at all
    assert r.channels_after["bn1"] == r.channels_after["layer.0.bn2"] == r.channels_after["layer.1.bn2"]


def test_slim_keeps_frozen_parameters_frozen_and_l1_leaves_frozen_gammas_alone() -> None:
    torch.manual_seed(0)
    m = _ResNetStage().eval()
    with torch.no_grad():
        m.layer[0].bn1.weight[:3] = 0.0
    frozen = ["layer.0.bn1.weight", "layer.0.bn1.bias", "layer.0.conv1.weight"]
    for name, p in m.named_parameters():
        p.requires_grad_(name not in frozen)
    r = slim(m, torch.randn(2, 3, 8, 8), prune=3 / 40)
    assert r.channels_after["layer.0.bn1"] == 5  # pruned, so Torch-Pruning made new Parameters
    assert {n for n, p in r.model.named_parameters() if not p.requires_grad} == set(frozen)
    # the L1 subgradient on a frozen gamma would move it under an optimizer with momentum or decay
    m.train()
    m(torch.randn(4, 3, 8, 8)).sum().backward()
    add_l1_subgradient(m, 0.01)
    assert m.layer[0].bn1.weight.grad is None and m.bn1.weight.grad is not None


def test_count_macs_counts_transposed_convolutions_as_torch_does() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2),
                      nn.ConvTranspose2d(4, 6, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(6 * 16 * 16, 3))
    x = torch.randn(1, 3, 8, 8)
    with FlopCounterMode(display=False) as fc:
        m(x)
    assert count_macs(m, x) == fc.get_total_flops() // 2  # a U-Net's up-convolutions were left out


def test_slim_task_measures_before_and_after_folded_and_names_the_metric(toy_task) -> None:  # type: ignore[no-untyped-def]
    from batchlab.slim import slim_task

    r = slim_task(toy_task, sparsity=1e-4, prune=0.3, epochs=1, finetune_epochs=0, baseline=False, latency_repeats=3)
    # both folded: the parameter drop is pruning's, not folding's (the BN parameters are gone on both sides)
    import copy

    from batchlab.norm import fold_bn

    folded = fold_bn(copy.deepcopy(r.models["sparse"]).eval())
    assert r.before["params"] == count_params(folded) < count_params(r.models["sparse"])
    assert r.before["bn_channels"] > 0 and r.metric == toy_task.metric_name
    assert r.to_dict()["higher_is_better"] == toy_task.higher_is_better
