"""Data sources: how a task's batches are made, behind one small interface.

Every tool that needs batches (the trainer, the memory finder, throughput, the noise scale,
precise BN, health checks) asks a source for them by index, so batches stay deterministic per seed
and the batch size may change from one step to the next:

- :class:`ArraySource` wraps an in-memory :class:`~batchlab.data.arrays.ArrayDataset`: a batch is
  one ``index_select`` (the built-in tasks' fast path, no per-example Python work).
- :class:`LoaderSource` wraps any torch ``Dataset``: a batch is ``collate_fn([dataset[i] for i in
  idx])``, made by a ``torch.utils.data.DataLoader`` whose batch sampler is the caller's sequence of
  index lists (so ``num_workers`` processes and pinned memory work as the user set them up).
  An ``IterableDataset`` has no indices: its examples are read in the order it yields them and cut
  into batches of the requested sizes.

Moving a batch to a device (:func:`move_to_device`) and counting its examples
(:func:`batch_size_of`) work on tensors nested in tuples, lists, mappings and objects with ``.to``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from batchlab.data.arrays import ArrayDataset

__all__ = ["ArraySource", "LoaderSource", "Source", "batch_size_of", "make_source", "move_to_device"]


def move_to_device(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor moved to ``device`` (tuples, lists, mappings, dataclasses, ``.to``)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # keep the mapping type (e.g. a BatchEncoding-like dict)
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: move_to_device(getattr(batch, f.name), device, non_blocking)
                                             for f in dataclasses.fields(batch) if f.init})
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (tuple, list)):
        values = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        values = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    else:
        return None
    for v in values:
        t = _first_tensor(v)
        if t is not None and t.dim() > 0:
            return t
    return None


#: the keys a mapping batch holds its targets under (the first one present is used)
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def _per_example_items(v: Any) -> bool:
    """A list/tuple holding one item per example: mappings (detection targets), or tensors of
    different shapes (a torchvision-style ``tuple(zip(*batch))`` of images)."""
    if not isinstance(v, (list, tuple)) or not v:
        return False
    if all(isinstance(i, Mapping) for i in v):
        return True
    return all(isinstance(i, torch.Tensor) for i in v) and len({tuple(i.shape) for i in v}) > 1


def batch_size_of(batch: Any) -> int:
    """Examples in ``batch``.

    A mapping: the length of its targets (``TARGET_KEYS``: a tensor's first dimension, or the length
    of a per-example list such as detection targets), else the first dimension most of its tensors
    share (a recommender's flat index list or offsets must not count as examples). A tuple/list:
    the first dimension of its first batched tensor (``(x, y)``, ``((x1, x2), y)``), else the length of
    a per-example list (``(images, targets)`` as a torchvision detection collate makes them). Else
    the first dimension of the first tensor found."""
    if isinstance(batch, Mapping):
        for k in TARGET_KEYS:
            v = batch.get(k)
            if _per_example_items(v) or (isinstance(v, (list, tuple)) and v and not isinstance(v[0], (torch.Tensor, list, tuple))):
                return len(v)
            t = _first_tensor(v)
            if t is not None:
                return int(t.shape[0])
        sizes = [int(t.shape[0]) for t in (_first_tensor(v) for v in batch.values()) if t is not None]
        if sizes:
            return max(dict.fromkeys(sizes), key=sizes.count)  # the most common; ties: the first seen
    if isinstance(batch, (tuple, list)):
        for v in batch:
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
        for v in batch:
            if _per_example_items(v):
                return len(v)
    t = _first_tensor(batch)
    if t is None and not isinstance(batch, (Mapping, tuple, list, str, bytes)):
        if callable(getattr(batch, "__len__", None)):  # a batch class of the user's own that says its size
            return len(batch)
        t = _first_tensor(list(getattr(batch, "__dict__", {}).values()))  # its tensors as attributes
    if t is None:
        raise TypeError(f"cannot tell the number of examples of a batch of type {type(batch).__name__}: no tensor "
                        "found in it (a collate_fn must return tensors, e.g. torch.stack or torch.tensor of the "
                        "lists; a batch class of your own can define __len__)")
    return int(t.shape[0])


class Source:
    """Where a task's batches come from. Subclasses implement ``__len__``, :meth:`fetch` and :meth:`stream`."""

    #: whether the source can return arbitrary examples by index (False for an IterableDataset)
    indexable: bool = True

    def __len__(self) -> int:
        raise NotImplementedError

    def fetch(self, idx: torch.Tensor) -> Any:
        """The batch of the examples at ``idx`` (a 1-D long tensor), made in this process."""
        raise NotImplementedError

    def stream(self, index_batches: Iterable[torch.Tensor], seed: int | None = None) -> Iterator[Any]:
        """The batches of ``index_batches`` in order (the iterable may be consumed ahead). ``seed``:
        seeds a DataLoader's worker seeds (default: ``self.seed`` where there is one)."""
        for idx in index_batches:
            yield self.fetch(idx)

    def ordered(self, batch_size: int, limit: int | None = None) -> Iterator[Any]:
        """Batches of ``batch_size`` in data-set order over the first ``limit`` examples (evaluation)."""
        n = len(self) if limit is None else min(limit, len(self))
        return self.stream(torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size))


class ArraySource(Source):
    """An in-memory :class:`ArrayDataset`; a batch is ``(x[idx], y[idx])``, one ``index_select`` each."""

    def __init__(self, data: ArrayDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def to(self, device: torch.device | str) -> ArraySource:
        return self if self.data.x.device == torch.device(device) else ArraySource(self.data.to(device))

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.data.x
        if idx.device != x.device:
            idx = idx.to(x.device)
        return x.index_select(0, idx), self.data.y.index_select(0, idx)


class _IndexLists:
    """A DataLoader batch sampler over a one-shot iterable of index tensors."""

    def __init__(self, index_batches: Iterable[torch.Tensor]) -> None:
        self.it = iter(index_batches)

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.it:
            yield idx.tolist()


class LoaderSource(Source):
    """Any torch ``Dataset``, batched by a ``DataLoader`` with the caller's indices.

    Args:
        dataset: a map-style ``Dataset`` (``__getitem__`` and ``__len__``) or an ``IterableDataset``.
        collate_fn: turns a list of examples into a batch (default: torch's ``default_collate``).
        num_workers: DataLoader worker processes (0: load in this process).
        pin_memory: pin batches in page-locked memory (for fast, non-blocking copies to a GPU).
        length: the number of examples of an ``IterableDataset`` without ``__len__`` (None: unknown).
    """

    def __init__(self, dataset: Dataset[Any], collate_fn: Callable[[list[Any]], Any] | None = None, *,
                 num_workers: int = 0, pin_memory: bool = False, length: int | None = None) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.indexable = not isinstance(dataset, IterableDataset)
        if length is None:
            try:
                length = len(dataset)  # type: ignore[arg-type]
            except TypeError:
                length = None
        self.length = length
        self.seed = 0  # seeds the DataLoader's worker seeds when stream() is given none (fit and iterate_batches give theirs)
        self._ordered: tuple[tuple[int, int], DataLoader[Any]] | None = None  # the evaluation loader

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ordered"] = None  # live worker processes do not travel
        return state

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError(f"{type(self.dataset).__name__} has no length; give a budget in steps or examples")
        return self.length

    def _loader(self, **kw: Any) -> DataLoader[Any]:
        return DataLoader(self.dataset, collate_fn=self.collate_fn, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, **kw)

    def fetch(self, idx: torch.Tensor) -> Any:
        if not self.indexable:
            return next(self.stream([idx]))
        return self.collate_fn([self.dataset[i] for i in idx.tolist()])

    def stream(self, index_batches: Iterable[torch.Tensor], seed: int | None = None) -> Iterator[Any]:
        if self.indexable:
            if self.num_workers == 0 and not self.pin_memory:
                yield from super().stream(index_batches)
                return
            # a generator of its own: creating the loader's iterator must not draw from the global
            # RNG (that would shift the model's dropout masks by the worker count); worker seeds
            # still differ from run to run through the indices' own seeded order
            gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
            yield from self._loader(batch_sampler=_IndexLists(index_batches), generator=gen)
            return
        # an IterableDataset: examples in its own order, re-read from the start when exhausted
        examples = self._examples()
        for idx in index_batches:
            items = []
            for _ in range(int(idx.numel())):
                try:
                    items.append(next(examples))
                except StopIteration:
                    examples = self._examples()
                    try:
                        items.append(next(examples))
                    except StopIteration:
                        raise ValueError(f"{type(self.dataset).__name__} yielded no examples") from None
            yield self.collate_fn(items)

    def ordered(self, batch_size: int, limit: int | None = None) -> Iterator[Any]:
        if self.indexable:
            if self.num_workers == 0:
                yield from super().ordered(batch_size, limit)
                return
            # evaluation repeats the same pass: one loader with persistent workers serves them all
            # (no worker start-up per evaluation), rebuilt only when the pass changes
            n = len(self) if limit is None else min(limit, len(self))
            if self._ordered is None or self._ordered[0] != (batch_size, n):
                order = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
                loader = self._loader(batch_sampler=order, persistent_workers=True,
                                      generator=torch.Generator().manual_seed(0))
                self._ordered = ((batch_size, n), loader)
            yield from self._ordered[1]
            return
        items: list[Any] = []  # an IterableDataset: one pass in its own order
        for i, example in enumerate(self._examples()):
            if limit is not None and i >= limit:
                break
            items.append(example)
            if len(items) == batch_size:
                yield self.collate_fn(items)
                items = []
        if items:
            yield self.collate_fn(items)

    def _examples(self) -> Iterator[Any]:
        return iter(self._loader(batch_size=None, collate_fn=_identity) if self.num_workers else self.dataset)


def _identity(x: Any) -> Any:
    return x


def make_source(data: Any, collate_fn: Callable[[list[Any]], Any] | None = None, *, num_workers: int = 0,
                pin_memory: bool = False) -> Source:
    """The source for ``data``: an :class:`ArraySource` for an ArrayDataset, else a :class:`LoaderSource`."""
    if isinstance(data, Source):
        return data
    if isinstance(data, ArrayDataset):
        return ArraySource(data)
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return LoaderSource(data, collate_fn, num_workers=num_workers, pin_memory=pin_memory)
    raise TypeError(f"data must be a torch Dataset (map-style or IterableDataset) or an ArrayDataset, "
                    f"got {type(data).__name__}")
