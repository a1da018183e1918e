"""A training data loader whose batches depend only on (seed, iteration), so a resumed run sees the
same data as an uninterrupted one.

detectron2's training loader restarts its stream when training resumes: the
:class:`~detectron2.data.samplers.TrainingSampler` starts again at the first image of its first
shuffle, the aspect-ratio buckets start empty, and the data-loader workers get new random seeds,
so the augmentations differ too. Here:

* the stream of image indices is the ``TrainingSampler``'s (the same shuffles for the same seed,
  split between processes the same way), but it can start at any iteration: the shuffles and the
  aspect-ratio grouping are replayed from the beginning on image sizes alone, without loading
  images (well under a second for COCO-sized runs);
* the random numbers used to map (load + augment) an image are seeded from the seed and the
  image's position in the global stream, so they do not depend on the worker that maps it, on
  ``num_workers``, or on where the run was resumed.

Together with :class:`smca_d2.engine.hooks.DeterministicSteps` (which sets the loader's start and
re-seeds the model's random numbers each iteration) a run resumed from a checkpoint computes the
same weights as one that was never interrupted (bit for bit on the CPU; on a GPU up to the
non-determinism of its kernels).
"""

import contextlib
import itertools
import logging
import random
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata

from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader", "sample_seed"]

logger = logging.getLogger(__name__)


def sample_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed derived from ``seed`` and ``keys`` (well mixed: nearby keys give unrelated seeds)."""
    return int(np.random.SeedSequence([int(seed) % (2**63)] + [int(k) for k in keys]).generate_state(1)[0])


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed python, numpy and torch (CPU) random numbers; restore their previous states after."""
    cpu = torch.default_generator  # the CPU generator only: CUDA's stays as the model left it
    states = random.getstate(), np.random.get_state(), cpu.get_state()
    random.seed(seed)
    np.random.seed(seed)
    cpu.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        cpu.set_state(states[2])


def _trivial_batch_collator(batch):
    return batch


class _SeededMapDataset(torchdata.Dataset):
    """Maps ``(global_position, index)`` to ``mapper(dataset[index])`` with random numbers seeded
    from the position. If the mapper returns None (an image it cannot use), another image, chosen
    from the same seed, takes its place."""

    def __init__(self, dataset, mapper: Callable, seed: int, max_tries: int = 20):
        self.dataset = dataset
        self.mapper = mapper
        self.seed = seed
        self.max_tries = max_tries

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        position, index = key
        seed = sample_seed(self.seed, position)
        with _seeded(seed):
            tried = []
            for attempt in range(self.max_tries):
                data = self.mapper(self.dataset[index]) if self.mapper is not None else self.dataset[index]
                if data is not None:
                    return data
                tried.append(index)
                index = random.Random(sample_seed(seed, attempt)).randrange(len(self.dataset))
        raise RuntimeError(
            f"The mapper could not use {self.max_tries} images in a row (dataset indices {tried}); "
            "see the warnings above for why."
        )


class _PositionBatches:
    """Iterable over batches of ``(global_position, index)`` starting at a given iteration."""

    def __init__(self, loader: "ResumableTrainLoader", start_iter: int):
        self.loader = loader
        self.start_iter = start_iter

    def __iter__(self):
        batches = self.loader.position_batches()
        for _ in range(self.start_iter):
            next(batches)
        return batches


class _LazyIterator:
    """Builds the real iterator at the first ``next``, so that the start iteration can be set after
    the trainer called ``iter(loader)`` (detectron2 v0.6 does so in its constructor)."""

    def __init__(self, loader: "ResumableTrainLoader"):
        self._loader = loader
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._loader._build_iterator()
        return next(self._iterator)


class ResumableTrainLoader:
    """Infinite iterable of per-process training batches (lists of mapped dicts).

    Batch ``i`` depends only on the dataset, the mapper, ``seed``, the batch size, the process's
    rank and the number of processes. :meth:`set_start` makes iteration begin at batch ``i``.

    Args:
        dataset: a list of dataset dicts (or a map-style torch Dataset; aspect-ratio grouping then
            needs ``"width"`` and ``"height"`` from each element and is turned off).
        mapper: maps a dataset dict to the model's input; may return None to skip an image.
        total_batch_size: batch size over all processes.
        aspect_ratio_grouping: batch landscape and portrait images separately, as detectron2 does.
        size_grouping: instead, batch images whose (height, width), rounded up to a multiple of
            this, are the same: a batch is padded to its largest image, so this pads much less
            when the augmentations keep each image's size (the demo: flips only, on images of
            96..160 px). Useless with random resizes (DETR's COCO recipe).
        num_workers: data-loading processes (the batches do not depend on it).
        collate_fn: applied to each list of mapped dicts (default: none).
        seed: of the shuffles and augmentations; None: a random seed shared by all processes.
        shuffle: shuffle the dataset each epoch.
    """

    def __init__(
        self,
        dataset,
        *,
        mapper: Optional[Callable],
        total_batch_size: int,
        aspect_ratio_grouping: bool = True,
        size_grouping: Optional[int] = None,
        num_workers: int = 0,
        collate_fn: Optional[Callable] = None,
        seed: Optional[int] = None,
        shuffle: bool = True,
    ):
        self.world_size, self.rank = comm.get_world_size(), comm.get_rank()
        if total_batch_size <= 0 or total_batch_size % self.world_size:
            raise ValueError(
                f"total_batch_size={total_batch_size} must be a positive multiple of the number of processes ({self.world_size})"
            )
        self.batch_size = total_batch_size // self.world_size
        positive_int = isinstance(size_grouping, (int, np.integer)) and not isinstance(size_grouping, bool)
        if size_grouping is not None and not (positive_int and size_grouping > 0):
            raise ValueError(f"size_grouping must be a positive number of pixels or None, got {size_grouping!r}")
        self.group_flags = None  # the group of each image, 0..G-1
        if isinstance(dataset, list):
            if size_grouping:
                q = int(size_grouping)
                sizes = np.array([(-(-d["height"] // q), -(-d["width"] // q)) for d in dataset]).reshape(-1, 2)
                self.group_flags = np.unique(sizes, axis=0, return_inverse=True)[1].reshape(-1)
            elif aspect_ratio_grouping:
                self.group_flags = np.array([0 if d["width"] > d["height"] else 1 for d in dataset], dtype=np.uint8)
            dataset = DatasetFromList(dataset, copy=False)
        elif aspect_ratio_grouping or size_grouping:
            logger.warning("Grouping images by shape needs a list of dataset dicts; it is off for this dataset.")
        self.dataset = dataset
        self.size = len(dataset)
        if self.size == 0:
            raise ValueError("the training dataset is empty")
        self.mapper = mapper
        self.num_workers = num_workers
        self.collate_fn = collate_fn or _trivial_batch_collator
        self.shuffle = shuffle
        self.seed = int(seed) if seed is not None else comm.shared_random_seed()
        self.start_iter = 0
        self._started = False

    def set_start(self, iteration: int, seed: Optional[int] = None) -> None:
        """Begin at batch ``iteration`` (the trainer's start iteration), optionally with another seed."""
        if self._started:
            raise RuntimeError("set_start() must be called before the first batch is taken")
        self.start_iter = int(iteration)
        if seed is not None:
            self.seed = int(seed)

    def index_stream(self) -> Iterator[Tuple[int, int]]:
        """``(global_position, dataset_index)`` of this process's share of the stream: the
        sequence of :class:`detectron2.data.samplers.TrainingSampler` for the same seed."""
        generator = torch.Generator()
        generator.manual_seed(self.seed)

        def indices():
            while True:
                if self.shuffle:
                    yield from torch.randperm(self.size, generator=generator).tolist()
                else:
                    yield from range(self.size)

        return itertools.islice(enumerate(indices()), self.rank, None, self.world_size)

    def position_batches(self) -> Iterator[List[Tuple[int, int]]]:
        """Batches of ``(global_position, dataset_index)``, from the first iteration."""
        stream = self.index_stream()
        if self.group_flags is None:
            while True:
                yield [next(stream) for _ in range(self.batch_size)]
        buckets = [[] for _ in range(int(self.group_flags.max()) + 1)]
        for position, index in stream:
            bucket = buckets[self.group_flags[index]]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]

    def _build_iterator(self):
        self._started = True
        if self.start_iter:
            logger.info(f"Training data: continuing the stream of seed {self.seed} at iteration {self.start_iter}.")
        loader = torchdata.DataLoader(
            _SeededMapDataset(self.dataset, self.mapper, self.seed),
            batch_sampler=_PositionBatches(self, self.start_iter),
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            # the loader's own random numbers must not come from (and shift) the global stream
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def __iter__(self):
        return _LazyIterator(self)


def build_resumable_train_loader(
    dataset,
    *,
    mapper,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    size_grouping: Optional[int] = None,
    num_workers: int = 0,
    collate_fn=None,
    seed: Optional[int] = None,
    shuffle: bool = True,
) -> ResumableTrainLoader:
    """Drop-in replacement of :func:`detectron2.data.build_detection_train_loader` (without a
    custom ``sampler``) returning a :class:`ResumableTrainLoader` (which adds ``size_grouping``)."""
    return ResumableTrainLoader(
        dataset,
        mapper=mapper,
        total_batch_size=total_batch_size,
        aspect_ratio_grouping=aspect_ratio_grouping,
        size_grouping=size_grouping,
        num_workers=num_workers,
        collate_fn=collate_fn,
        seed=seed,
        shuffle=shuffle,
    )
