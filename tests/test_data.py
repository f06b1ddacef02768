"""Data sets: shapes, dtypes, determinism, RNG neutrality, and every bad-file case of the readers."""

from __future__ import annotations

import gzip
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from batchlab.data import (
    ArrayDataset,
    SequenceDataset,
    load_cifar10,
    load_digits,
    load_mnist,
    load_mnist1d,
    make_gaussian_mixture,
    make_sequences,
    read_cifar_batch,
    read_idx_images,
    read_idx_labels,
)
from batchlab.data import mnist1d as mnist1d_mod
from batchlab.data.idx import MNIST_FILES


# --------------------------------------------------------------------------- fixtures in the real formats
def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return head + payload


def write_idx(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_mnist_folder(root: Path, n_train: int = 12, n_test: int = 6, gz: bool = False) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / MNIST_FILES[f"{split}_images"], idx_bytes(2051, (n, 28, 28), imgs.tobytes()), gz)
        write_idx(root / MNIST_FILES[f"{split}_labels"], idx_bytes(2049, (n,), labels.tobytes()), gz)
    return root


def write_cifar_batch(path: Path, n: int, *, data: object = None, labels: object = None) -> None:
    rng = np.random.default_rng(len(path.name))
    d = {
        b"batch_label": b"test",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8) if data is None else data,
        b"labels": [i % 10 for i in range(n)] if labels is None else labels,
    }
    with open(path, "wb") as f:
        pickle.dump(d, f)


def make_cifar_folder(root: Path, n: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        write_cifar_batch(root / f"data_batch_{i}", n)
    write_cifar_batch(root / "test_batch", n)
    return root


# --------------------------------------------------------------------------- generated data sets
def test_digits_shapes_standardized_and_stratified() -> None:
    tr, va = load_digits(seed=0)
    assert tr.x.shape == (1438, 1, 8, 8) and va.x.shape == (359, 1, 8, 8)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert abs(float(tr.x.mean())) < 1e-4 and abs(float(tr.x.std()) - 1) < 1e-3
    # stratified: every class keeps ~20% in val
    frac = va.y.bincount(minlength=10).float() / (tr.y.bincount(minlength=10) + va.y.bincount(minlength=10)).float()
    assert torch.all((frac - 0.2).abs() < 0.02), frac


def test_digits_same_seed_same_split_other_seed_differs() -> None:
    a, _ = load_digits(seed=3)
    b, _ = load_digits(seed=3)
    c, _ = load_digits(seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


def test_mnist1d_shapes_cache_and_rng_neutral(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHLAB_CACHE", str(tmp_path / "cache"))
    mnist1d_mod._cached.cache_clear()
    np.random.seed(123)
    random.seed(123)
    np_before = np.random.get_state()
    py_before = random.getstate()
    tr, te = load_mnist1d(200, seed=5)
    np_after = np.random.get_state()
    assert np_before[0] == np_after[0] and np.array_equal(np_before[1], np_after[1]) and np_before[2:] == np_after[2:]
    assert random.getstate() == py_before
    assert tr.x.shape == (160, 1, 40) and te.x.shape == (40, 1, 40)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert int(tr.y.min()) >= 0 and int(tr.y.max()) <= 9
    files = list((tmp_path / "cache").glob("mnist1d-*.npz"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    # memory cache, then disk cache after clearing memory: identical arrays
    tr2, _ = load_mnist1d(200, seed=5)
    mnist1d_mod._cached.cache_clear()
    tr3, _ = load_mnist1d(200, seed=5)
    assert torch.equal(tr.x, tr2.x) and torch.equal(tr.x, tr3.x) and torch.equal(tr.y, tr3.y)
    # generation without the disk cache gives the same bits
    tr4, _ = load_mnist1d(200, seed=5, disk_cache=False)
    assert torch.equal(tr.x, tr4.x)
    other, _ = load_mnist1d(200, seed=6, disk_cache=False)
    assert not torch.equal(tr.x, other.x)


def test_mnist1d_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"n_samples must be an integer >= 10.*got 5"):
        load_mnist1d(5)
    with pytest.raises(ValueError, match=r"seed must be an integer, got 1.5"):
        load_mnist1d(100, seed=1.5)  # type: ignore[arg-type]


def test_gaussian_mixture_seeded() -> None:
    a_tr, a_va = make_gaussian_mixture(500, dim=6, num_classes=3, seed=1)
    b_tr, _ = make_gaussian_mixture(500, dim=6, num_classes=3, seed=1)
    c_tr, _ = make_gaussian_mixture(500, dim=6, num_classes=3, seed=2)
    assert a_tr.x.shape == (400, 6) and len(a_va) == 100
    assert a_tr.x.dtype == torch.float32 and a_tr.y.dtype == torch.int64
    assert torch.equal(a_tr.x, b_tr.x) and not torch.equal(a_tr.x, c_tr.x)
    assert set(a_tr.y.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2, got 1"):
        make_gaussian_mixture(100, num_classes=1)
    with pytest.raises(ValueError, match=r"noise must be >= 0, got -1"):
        make_gaussian_mixture(100, noise=-1)


def test_sequences_padding_mask_and_labels_from_content() -> None:
    tr, va = make_sequences(300, min_len=3, max_len=10, dim=5, num_classes=3, seed=0)
    assert isinstance(tr, SequenceDataset) and tr.x.shape == (240, 10, 6) and len(va) == 60
    assert tr.features.shape == (240, 10, 5)
    lengths = tr.lengths
    assert int(lengths.min()) >= 3 and int(lengths.max()) <= 10
    pos = torch.arange(10).unsqueeze(0)
    assert torch.equal(tr.mask, pos < lengths.unsqueeze(1))  # padding is at the end
    assert torch.all(tr.features[~tr.mask] == 0)
    # same seed, same data; subset and to() keep the mask-aware type
    again, _ = make_sequences(300, min_len=3, max_len=10, dim=5, num_classes=3, seed=0)
    assert torch.equal(tr.x, again.x) and torch.equal(tr.y, again.y)
    assert isinstance(tr.subset(10), SequenceDataset) and isinstance(tr.to("cpu"), SequenceDataset)
    with pytest.raises(ValueError, match=r"max_len must be >= min_len \(5\), got 4"):
        make_sequences(10, min_len=5, max_len=4)


def test_batches_reshuffle_every_epoch() -> None:
    ds = ArrayDataset(torch.arange(100).float().unsqueeze(1), torch.zeros(100, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    epochs = [torch.cat([x for x, _ in ds.batches(10, generator=g)]).squeeze(1) for _ in range(4)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(100))
    assert len({tuple(e.tolist()) for e in epochs}) == 4


# --------------------------------------------------------------------------- MNIST idx files
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_raw_and_gz(tmp_path: Path, gz: bool) -> None:
    root = make_mnist_folder(tmp_path / "m", gz=gz)
    tr, te = load_mnist(root)
    assert tr.x.shape == (12, 1, 28, 28) and te.x.shape == (6, 1, 28, 28)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert tr.y.tolist() == [i % 10 for i in range(12)]
    raw, _ = load_mnist(root, normalize=False)
    assert 0.0 <= float(raw.x.min()) and float(raw.x.max()) <= 1.0


def test_mnist_torchvision_layout(tmp_path: Path) -> None:
    make_mnist_folder(tmp_path / "MNIST" / "raw", gz=True)
    tr, _ = load_mnist(tmp_path)
    assert len(tr) == 12


def test_mnist_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not exist.*train-images-idx3-ubyte\[\.gz\].*t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path / "nowhere")
    root = make_mnist_folder(tmp_path / "m")
    (root / MNIST_FILES["test_labels"]).unlink()
    with pytest.raises(ValueError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]; expected files: train-images"):
        load_mnist(root)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "imgs", idx_bytes(2049, (1, 28, 28), bytes(784)), gz=False)
    with pytest.raises(ValueError, match=r"imgs: wrong magic number for idx images: expected 2051, found 2049"):
        read_idx_images(p)
    p = write_idx(tmp_path / "labels", idx_bytes(2051, (1,), bytes(1)), gz=True)
    with pytest.raises(ValueError, match=r"labels\.gz: wrong magic number for idx labels: expected 2049, found 2051"):
        read_idx_labels(p)


def test_idx_wrong_byte_count_and_dims(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "imgs", idx_bytes(2051, (2, 28, 28), bytes(784 * 2 - 5)), gz=False)
    with pytest.raises(ValueError, match=r"imgs: byte count does not match header dims \(2, 28, 28\): expected 1584 bytes, found 1579"):
        read_idx_images(p)
    p = write_idx(tmp_path / "small", idx_bytes(2051, (2, 8, 8), bytes(128)), gz=False)
    with pytest.raises(ValueError, match=r"small: expected images of 28x28 pixels, found 8x8"):
        read_idx_images(p)
    assert read_idx_images(p, image_shape=None).shape == (2, 8, 8)
    p = write_idx(tmp_path / "short", b"\x00\x00", gz=False)
    with pytest.raises(ValueError, match=r"short: file too short for an idx header: expected at least 16 bytes, found 2"):
        read_idx_images(p)


def test_idx_labels_out_of_range_and_count_mismatch(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "labels", idx_bytes(2049, (3,), bytes([1, 2, 12])), gz=False)
    with pytest.raises(ValueError, match=r"labels: labels must be in 0\.\.9, found label 12"):
        read_idx_labels(p)
    root = make_mnist_folder(tmp_path / "m")
    write_idx(root / MNIST_FILES["train_labels"], idx_bytes(2049, (11,), bytes(11)), gz=False)
    with pytest.raises(ValueError, match=r"holds 12 images but .*train-labels-idx1-ubyte holds 11 labels; expected equal counts"):
        load_mnist(root)


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    p = tmp_path / "imgs.gz"
    p.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match=r"imgs\.gz: cannot read idx file"):
        read_idx_images(p)


# --------------------------------------------------------------------------- CIFAR-10 pickles
@pytest.mark.parametrize("nested", [False, True])
def test_cifar_reads_folder_or_subfolder(tmp_path: Path, nested: bool) -> None:
    make_cifar_folder(tmp_path / "cifar-10-batches-py" if nested else tmp_path)
    tr, te = load_cifar10(tmp_path)
    assert tr.x.shape == (20, 3, 32, 32) and te.x.shape == (4, 3, 32, 32)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    raw, _ = load_cifar10(tmp_path, normalize=False)
    x0 = read_cifar_batch(tmp_path / ("cifar-10-batches-py" if nested else "") / "data_batch_1")[0]
    assert torch.allclose(raw.x[:4], torch.from_numpy(x0).float() / 255)


def test_cifar_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"CIFAR-10 folder .*nowhere.* does not exist.*data_batch_1.*test_batch"):
        load_cifar10(tmp_path / "nowhere")
    make_cifar_folder(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / "test_batch").unlink()
    with pytest.raises(ValueError, match=r"missing data_batch_3, test_batch; expected files: data_batch_1"):
        load_cifar10(tmp_path)


def test_cifar_bad_batches(tmp_path: Path) -> None:
    p = tmp_path / "b"
    write_cifar_batch(p, 2, data=np.zeros((2, 3000), dtype=np.uint8))
    with pytest.raises(ValueError, match=re.escape(f"{p}: expected b'data' of shape (N, 3072), found (2, 3000)")):
        read_cifar_batch(p)
    write_cifar_batch(p, 2, data=np.zeros((2, 3072), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected b'data' to be a uint8 numpy array, found ndarray of float32"):
        read_cifar_batch(p)
    write_cifar_batch(p, 2, labels=[0, 10])
    with pytest.raises(ValueError, match=r"b: labels must be in 0\.\.9, found label 10"):
        read_cifar_batch(p)
    write_cifar_batch(p, 2, labels=[0, -1])
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9, found label -1"):
        read_cifar_batch(p)
    write_cifar_batch(p, 3, labels=[0, 1])
    with pytest.raises(ValueError, match=r"b'data' holds 3 images but b'labels' holds 2 labels"):
        read_cifar_batch(p)
    with open(p, "wb") as f:
        pickle.dump({b"images": 1}, f)
    with pytest.raises(ValueError, match=r"expected keys b'data' and b'labels', found b'images'"):
        read_cifar_batch(p)
    with open(p, "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ValueError, match=r"expected a pickled dict with b'data' and b'labels', found list"):
        read_cifar_batch(p)
    p.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"b: cannot unpickle CIFAR-10 batch"):
        read_cifar_batch(p)


def test_a_dict_batch_counts_its_examples_by_its_targets_not_its_first_tensor() -> None:
    from batchlab.data.sources import batch_size_of

    rec = {"indices": torch.arange(123), "offsets": torch.arange(5), "dense": torch.zeros(5, 3)}
    assert batch_size_of({**rec, "labels": torch.zeros(5)}) == 5  # a recommender's flat index list first
    assert batch_size_of(rec) == 5  # no targets: the size most tensors share
    assert batch_size_of({"input_ids": torch.zeros(4, 7), "attention_mask": torch.zeros(4, 7)}) == 4
    with pytest.raises(TypeError, match="a collate_fn must return tensors"):
        batch_size_of({"x": [1, 2, 3]})


def test_batch_size_counts_examples_not_boxes_or_channels() -> None:
    # detection-style batches: a dict with per-image target dicts, and torchvision's tuple(zip(*batch))
    from batchlab.data.sources import batch_size_of

    images = torch.randn(4, 3, 16, 16)
    targets = [{"boxes": torch.randn(k, 4), "labels": torch.ones(k, dtype=torch.long)} for k in (1, 0, 2, 1)]
    assert batch_size_of({"images": images, "targets": targets}) == 4  # was the first image's box count
    assert batch_size_of((tuple(images[i, :, : 8 + i] for i in range(4)), tuple(targets))) == 4  # was 3 (channels)
    assert batch_size_of((tuple(images), tuple(targets))) == 4
    assert batch_size_of((torch.randn(5, 2), torch.zeros(5))) == 5
    assert batch_size_of(((torch.randn(6, 2), torch.randn(6, 2)), torch.zeros(6))) == 6  # a pair input
    assert batch_size_of({"x": torch.zeros(7, 9), "labels": list(range(7))}) == 7


def test_a_batch_class_of_the_users_own_is_counted_by_its_len_or_its_tensors() -> None:
    # a collate returning an object with tensor attributes and .to() was refused: "it holds no tensor"
    from batchlab.data.sources import batch_size_of

    class Batch:
        def __init__(self, n: int) -> None:
            self.x, self.y = torch.zeros(n, 3), torch.zeros(n)

        def to(self, device):  # type: ignore[no-untyped-def]
            return self

    class SizedBatch(Batch):
        def __len__(self) -> int:
            return int(self.x.shape[0])

    assert batch_size_of(SizedBatch(6)) == 6
    assert batch_size_of(Batch(5)) == 5
    with pytest.raises(TypeError, match="a batch class of your own can define __len__"):
        batch_size_of(object())
