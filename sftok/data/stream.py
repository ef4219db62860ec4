"""The resumable training stream, bounded-memory validation batches, and re-batching.

`TrainStream` is an infinite iterator of batches (images B×3×H×W float in [0, 1], labels B long).
Map-style data: epoch e visits the samples in the permutation drawn from (seed, e); batches run
across epoch boundaries, so no sample is dropped and any dataset size works. Sample i of epoch e
gets its augmentation seed from (seed, e, i): the dataset's random crop and the stream's
horizontal flip are pure functions of it. The state is therefore just (epoch, position of the next
sample in that epoch's permutation), and a stream restored from `state_dict()` yields exactly the
batches the uninterrupted one would, with or without DataLoader workers (the workers receive
(index, seed, flip) keys from a batch sampler and never draw random numbers of their own).

Iterable data (`ShardDataset`): the same state, but resume is approximate; see `shards.py`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sftok.data.seeding import generator, mix
from sftok.data.transforms import hflip

Batch = tuple[torch.Tensor, torch.Tensor]  # images B×3×H×W float [0, 1], labels B long


def loader_options(num_workers: int, pin_memory: bool = False) -> dict[str, int | bool]:
    """Keyword arguments of every DataLoader here: workers persist across iterations of the
    same loader (no re-spawn and dataset re-copy per pass) whenever there are workers; pinned
    memory only when asked (CUDA)."""
    return {"num_workers": num_workers, "persistent_workers": num_workers > 0,
            "pin_memory": pin_memory}


def _collate(items: list[tuple[torch.Tensor, int]]) -> Batch:
    images, labels = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _collate_counted(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """(images, labels, undecodable files met) of a batch of (image, label[, skipped]) items;
    None items (undecodable, evaluation view) are left out and counted. The count travels
    with the batch because DataLoader workers keep their own dataset copies."""
    kept = [it for it in items if it is not None]
    skipped = len(items) - len(kept) + sum(int(it[2]) for it in kept if len(it) > 2)
    if not kept:
        return None, None, skipped
    images, labels = _collate([(it[0], it[1]) for it in kept])
    return images, labels, skipped


class _Keyed(Dataset):
    """Looks up (index, sample seed, flip) keys: what the workers run for map-style data."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, bool]) -> tuple[torch.Tensor, int, int]:
        """(image, label, undecodable files this lookup met and replaced)."""
        index, seed, flip = key
        before = getattr(self.dataset, "skipped", 0)
        if hasattr(self.dataset, "sample"):
            image, label = self.dataset.sample(index, seed)
        else:  # any map-style dataset of (image, label) works, without its own augmentation
            image, label = self.dataset[index]
        met = getattr(self.dataset, "skipped", 0) - before
        return (hflip(image) if flip else image), int(label), met


class _KeyBatches:
    """Infinite batch sampler: lists of keys from (epoch, position) on, spanning epochs."""

    def __init__(self, stream: TrainStream, epoch: int, position: int):
        self.stream, self.epoch, self.position = stream, epoch, position

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        s, n = self.stream, self.stream.num_samples
        epoch, position = self.epoch, self.position
        while True:
            keys = []
            while len(keys) < s.batch_size:
                perm = s._permutation(epoch)
                take = min(s.batch_size - len(keys), n - position)
                keys += [s._key(epoch, int(i)) for i in perm[position:position + take]]
                position += take
                if position == n:
                    epoch, position = epoch + 1, 0
            yield keys


class TrainStream:
    """Infinite, exactly resumable stream of training batches (see module docstring).

    Args:
        dataset: map-style (`EmbeddedPhotos`, `ImageFolder`, any Dataset of (image, label)) or
            a `ShardDataset`.
        batch_size: B.
        seed: the data-order seed (the trial's seed): permutations and augmentation derive from it.
        flip: random horizontal flips (probability 1/2, paper preprocessing).
        num_workers: DataLoader worker processes (0: load in this process); they persist
            for as long as the stream iterates (`loader_options`).
        pin_memory: hand out batches in page-locked memory, so that the training step's
            `.to(device, non_blocking=True)` really overlaps the copy with compute. Only for a
            CUDA device (the caller passes `device.type == "cuda"`; pinning needs a driver).
    """

    def __init__(self, dataset, batch_size: int, seed: int, flip: bool = True,
                 num_workers: int = 0, pin_memory: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.dataset = dataset
        self.batch_size, self.seed, self.flip = batch_size, seed, flip
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.iterable = isinstance(dataset, IterableDataset)
        if self.iterable and not hasattr(dataset, "configured"):
            raise TypeError("TrainStream needs a map-style dataset or a ShardDataset (an iterable "
                            "must accept seed/epoch/skip/flip through `configured()`)")
        self.num_samples = None if self.iterable else len(dataset)
        if self.num_samples == 0:
            raise ValueError("TrainStream: the dataset is empty")
        self.epoch, self.position = 0, 0  # the next sample: position-th of epoch `epoch`
        self._skipped = 0
        self._it: Iterator | None = None
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    @property
    def skipped(self) -> int:
        """Undecodable files met (and replaced) by this stream so far; with DataLoader workers,
        a file met by two workers counts twice. Shards: those met in this process."""
        return getattr(self.dataset, "skipped", 0) if self.iterable else self._skipped

    # --- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int | None]:
        """Plain ints: safe in a JSON sidecar or a safetensors metadata dict."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state.get("num_samples") != self.num_samples:
            raise ValueError(
                f"TrainStream state is for seed={state['seed']}, num_samples="
                f"{state.get('num_samples')}; this stream has seed={self.seed}, num_samples="
                f"{self.num_samples}: resuming would not reproduce the data order")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._it = None  # restart loading (and workers) from the restored position

    # --- map-style ------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = torch.randperm(self.num_samples, generator=generator(self.seed, epoch))
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def _key(self, epoch: int, index: int) -> tuple[int, int, bool]:
        sample_seed = mix(self.seed, epoch, index)
        return index, sample_seed, self.flip and bool(mix(sample_seed, 1) & 1)

    def _map_batches(self) -> Iterator[Batch]:
        sampler = _KeyBatches(self, self.epoch, self.position)
        if self.num_workers == 0:
            keyed = _Keyed(self.dataset)
            for keys in sampler:
                yield _collate_counted([keyed[k] for k in keys])
        else:
            yield from DataLoader(_Keyed(self.dataset), batch_sampler=sampler,
                                  collate_fn=_collate_counted,
                                  **loader_options(self.num_workers, self.pin_memory))

    # --- iterable -------------------------------------------------------------------------

    def _iterable_samples(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(epoch, position, image, label) from the restored state on, loader batches unrolled."""
        epoch, position = self.epoch, self.position
        while True:
            view = self.dataset.configured(seed=self.seed, epoch=epoch, skip=position,
                                           flip=self.flip)
            # Not pinned here: the samples are re-stacked into batches below (pinned there).
            loader = DataLoader(view, batch_size=self.batch_size, collate_fn=_collate,
                                **loader_options(self.num_workers, pin_memory=False))
            start = position
            for images, labels in loader:
                for image, label in zip(images, labels):
                    yield epoch, position, image, label
                    position += 1
            if position == 0 and start == 0:
                raise RuntimeError("TrainStream: a whole epoch of the shards gave no samples")
            epoch, position = epoch + 1, 0

    def _iterable_batches(self) -> Iterator[Batch]:
        samples = self._iterable_samples()
        while True:
            chunk = [next(samples) for _ in range(self.batch_size)]
            self._next_state = (chunk[-1][0], chunk[-1][1] + 1)
            yield torch.stack([c[2] for c in chunk]), torch.stack([c[3] for c in chunk])

    # --- iteration ------------------------------------------------------------------------

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._iterable_batches() if self.iterable else self._map_batches()
        batch = next(self._it)
        if self.iterable:
            self.epoch, self.position = self._next_state
        else:  # the state is pure arithmetic on sample counts, whatever the workers prefetched
            images, labels, met = batch
            batch, self._skipped = (images, labels), self._skipped + met
            self.position += self.batch_size
            self.epoch += self.position // self.num_samples
            self.position %= self.num_samples
        if self.pin_memory and not self._loader_pins:
            batch = tuple(t.pin_memory() if isinstance(t, torch.Tensor) else t
                          for t in batch)
        return batch

    @property
    def _loader_pins(self) -> bool:
        """Whether the DataLoader already pins the batches (map-style data with workers: its
        pinning thread overlaps with the step); otherwise `__next__` pins them."""
        return not self.iterable and self.num_workers > 0


class ValBatches:
    """Evaluation images in dataset order, B×3×H×W float [0, 1] (the last batch may be smaller).

    Uses the deterministic (centre-crop) view and holds one batch at a time. An undecodable
    file is left out, never replaced, and counted: after iterating, `images` is the number of
    images yielded and `skipped` the number of undecodable files met on the way. `max_images`
    caps the images yielded (None: the whole split); files are read until it is reached.
    """

    def __init__(self, val_dataset, batch_size: int, max_images: int | None = None,
                 num_workers: int = 0):
        self.dataset, self.batch_size = val_dataset, batch_size
        self.max_images, self.num_workers = max_images, num_workers
        self.images = 0
        self.skipped = 0

    def summary(self) -> str | None:
        """'N undecodable image file(s) left out; M evaluated' (None when nothing was skipped)."""
        if not self.skipped:
            return None
        return (f"{self.skipped} undecodable validation image file(s) left out; "
                f"{self.images} evaluated")

    def __iter__(self) -> Iterator[torch.Tensor]:
        ds = self.dataset
        self.images, self.skipped = 0, 0
        if isinstance(ds, IterableDataset):  # shards skip bad samples themselves; count here
            source = ds.configured(flip=False) if hasattr(ds, "configured") else ds
            before = getattr(ds, "skipped", 0)
        else:
            source, before = ds, None
        loader = DataLoader(source, batch_size=self.batch_size, collate_fn=_collate_counted,
                            **loader_options(self.num_workers))
        remaining = self.max_images
        try:
            for images, _labels, met in loader:
                self.skipped += met
                if images is None:
                    continue
                if remaining is not None:
                    images = images[:remaining]
                    remaining -= images.shape[0]
                if images.shape[0]:
                    self.images += images.shape[0]
                    yield images
                if remaining is not None and remaining <= 0:
                    return
        finally:
            if before is not None and self.num_workers == 0:
                self.skipped += getattr(ds, "skipped", 0) - before


def val_batches(val_dataset, batch_size: int, max_images: int | None = None,
                num_workers: int = 0) -> ValBatches:
    """The evaluation batches of `val_dataset` (see `ValBatches`: bad files left out, counted)."""
    return ValBatches(val_dataset, batch_size, max_images, num_workers)


def image_batches(images: Iterable, batch_size: int, max_images: int | None
                  ) -> Iterator[torch.Tensor]:
    """Float B×3×H×W batches of at most batch_size, max_images in all. Accepts tensors,
    (images, labels) tuples as the data module yields, or dicts with an 'image(s)' key."""
    seen = 0
    for batch in images:
        if isinstance(batch, dict):
            batch = batch.get("images", batch.get("image"))
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not torch.is_tensor(batch) or batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError("evaluate: each batch must be images B×3×H×W (or (images, labels))")
        for start in range(0, batch.shape[0], batch_size):
            if max_images is not None and seen >= max_images:
                return
            chunk = batch[start:start + batch_size]
            if max_images is not None:
                chunk = chunk[:max_images - seen]
            seen += chunk.shape[0]
            yield chunk
        if max_images is not None and seen >= max_images:
            return
