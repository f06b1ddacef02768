"""Shapes-32 (generated 32x32 RGB shapes) and the shapes32-cnn and shapes32-vgg tasks."""

from __future__ import annotations

import pytest
import torch

from batchlab.data import generate_shapes32, load_shapes32
from batchlab.data.shapes32 import CLASS_NAMES, NUM_CLASSES
from batchlab.tasks import get_task, list_tasks
from batchlab.train import TrainConfig, fit


def test_deterministic_by_seed_and_seed_sensitive():
    x1, y1 = generate_shapes32(200, seed=3)
    x2, y2 = generate_shapes32(200, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, y3 = generate_shapes32(200, seed=4)
    assert not torch.equal(x1, x3) and not torch.equal(y1, y3)
    x1[0] = 0  # a fresh copy: the cached arrays are not touched
    assert not torch.equal(x1, generate_shapes32(200, seed=3)[0])


def test_shapes_dtypes_and_balanced_labels():
    x, y = generate_shapes32(230, seed=0)
    assert x.shape == (230, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (230,) and y.dtype == torch.int64
    counts = torch.bincount(y, minlength=NUM_CLASSES)
    assert len(CLASS_NAMES) == NUM_CLASSES == 10 and int(counts.min()) == 23 == int(counts.max())
    assert set(y[:50].tolist()) != {int(y[0])}  # shuffled, not in class blocks
    # images vary: every class uses a good part of the 8-bit range, and no two images are equal
    assert int(x.max()) > 200 and int(x.min()) < 50
    assert len({bytes(img.numpy()) for img in x}) == 230


def test_classes_differ_in_shape_not_in_colour():
    x, y = generate_shapes32(1000, seed=1)
    means = torch.stack([x[y == c].float().mean(dim=(0, 2, 3)) for c in range(NUM_CLASSES)])  # (10, 3)
    assert float(means.std(dim=0).max()) < 8  # per-class mean colour within a few grey levels of each other
    per_image = x.float().mean(dim=(2, 3))  # the per-image colour varies a lot (what BN at batch 2 sees)
    assert float(per_image.std(dim=0).min()) > 15


def test_load_standardizes_on_the_training_split():
    train, val = load_shapes32(300, seed=0, val_fraction=0.2)
    assert len(train) == 240 and len(val) == 60
    assert train.x.dtype == torch.float32 and train.x.shape[1:] == (3, 32, 32)
    m, s = train.x.mean(dim=(0, 2, 3)), train.x.std(dim=(0, 2, 3))
    assert torch.allclose(m, torch.zeros(3), atol=1e-4) and torch.allclose(s, torch.ones(3), atol=1e-3)


@pytest.mark.parametrize("kwargs, match", [({"n_samples": 5}, "n_samples"), ({"n_samples": 100, "seed": 1.5}, "seed"),
                                           ({"n_samples": 100, "noise": -1}, "noise")])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_shapes32(**kwargs)


def test_task_is_registered_and_passes_check():
    assert "shapes32-cnn" in list_tasks()
    task = get_task("shapes32-cnn", n_samples=200)
    task.check()
    assert task.name == "shapes32-cnn" and task.num_classes == 10 and task.batch_size == 128
    assert len(task.train_set) == 160 and len(task.val_set) == 40
    for norm in ("batch", "group", "none"):
        out = task.make_model(norm=norm)(task.train_set.x[:4])
        assert out.shape == (4, 10)
    bns = [m for m in task.make_model().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 3 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in task.make_model(norm="group").modules())
    assert get_task("shapes32-cnn", n_samples=200).fingerprint() == task.fingerprint()
    assert get_task("shapes32-cnn", n_samples=200, seed=1).fingerprint() != task.fingerprint()


def test_a_short_run_learns_above_chance():
    torch.set_num_threads(1)
    task = get_task("shapes32-cnn", n_samples=1000)
    r = fit(task, TrainConfig(batch_size=32, lr=0.025, optimizer="momentum", epochs=3, seed=0, eval_train=False))
    assert r.ok and r.metric("val_acc") > 0.3  # chance is 0.1


def test_vgg_task_pools_to_one_by_one_with_five_norms():
    task = get_task("shapes32-vgg", n_samples=200)
    task.check()
    assert task.name == "shapes32-vgg" and len(task.train_set) == 160
    assert torch.equal(task.train_set.x, get_task("shapes32-cnn", n_samples=200).train_set.x)  # the same images
    model = task.make_model()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [m.num_features for m in bns] == [8, 16, 32, 64, 64]
    sizes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: sizes.append(tuple(out.shape[2:]))) for m in bns]
    assert model(task.train_set.x[:2]).shape == (2, 10)
    for h in hooks:
        h.remove()
    assert sizes == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]  # the last norms see 4x4 and 2x2 maps
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in task.make_model(norm="group").modules())
