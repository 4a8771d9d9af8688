"""Batches of a split for one of N ranks, read from the shard format (lipnext.data).

ShardLoader gives each of N ranks a disjoint share of a split, reshuffled per
epoch from a seed, and resumes mid-epoch from its state_dict. Shares are
contiguous runs of the (shuffled) shard order, so a rank reads about 1/N of
the shards.
"""

import hashlib
import math
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from lipnext.augment import AUGMENTATIONS
from lipnext.data import Dataset, decode_png, open_dataset


def _generator(*key) -> torch.Generator:
    """An independent stream per key, e.g. ('window', seed, epoch, rank, w)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


_END = object()


class ShardLoader:
    """Batches (images float32 (B, C, H, W) in [0, 1], labels int64 (B,)) of
    one split for one of `world_size` ranks.

    Each epoch the shards are permuted (from seed and epoch) and their samples,
    laid end to end, are cut into world_size contiguous shares: disjoint and
    together complete, sizes differing by at most one. Every rank yields
    len(loader) batches, so collectives stay in step: with drop_last the shares
    are equal and the last partial batch is dropped; without it, a rank whose
    share is one sample short may end on an empty batch. A share is shuffled within windows of about
    `shuffle_window` samples (shards are shuffled when written), and a
    background thread keeps `prefetch` batches ready while `threads` threads
    read the next window's shards and decode PNGs.

    Iteration continues where it stopped; a full pass moves on to the next
    epoch. `state_dict()` / `load_state_dict()` resume at the same sample, with
    the same augmentation draws.
    """

    def __init__(
        self,
        dataset: Dataset | str,
        split: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | str | None = None,
        prefetch: int = 4,
        shuffle_window: int = 16384,
        threads: int = 4,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if min(batch_size, prefetch, shuffle_window, threads) < 1:
            raise ValueError("batch_size, prefetch, shuffle_window and threads must be positive")
        self.dataset = open_dataset(dataset) if isinstance(dataset, str) else dataset
        self.shards = self.dataset.manifest.shards(split)
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.augment = AUGMENTATIONS[augment] if isinstance(augment, str) else augment
        self.prefetch, self.threads = prefetch, threads
        # Whole batches per window, so that no batch straddles two windows.
        self.window = math.ceil(shuffle_window / batch_size) * batch_size
        n = self.dataset.manifest.count(split)
        if drop_last:
            self.share, self.start = n // world_size, rank * (n // world_size)
        else:
            self.share = n // world_size + (rank < n % world_size)
            self.start = rank * (n // world_size) + min(rank, n % world_size)
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        if self.drop_last:
            return self.share // self.batch_size
        n = self.dataset.manifest.count(self.split)
        return math.ceil(math.ceil(n / self.world_size) / self.batch_size)

    def set_epoch(self, epoch: int):
        """Start `epoch` from its first batch."""
        self.epoch, self.batch = epoch, 0

    def _position(self) -> tuple[int, int]:
        if len(self) and self.batch >= len(self):
            return self.epoch + 1, 0
        return self.epoch, self.batch

    def _order_key(self) -> dict:
        return dict(
            split=self.split,
            samples=self.dataset.manifest.count(self.split),
            batch_size=self.batch_size,
            world_size=self.world_size,
            seed=self.seed,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            window=self.window,
        )

    def state_dict(self) -> dict:
        """Where the next batch comes from, and what fixes the sample order."""
        epoch, batch = self._position()
        return dict(epoch=epoch, batch=batch, **self._order_key())

    def load_state_dict(self, state: dict):
        differ = [f"{k}: {state.get(k)!r} != {v!r}" for k, v in self._order_key().items() if state.get(k) != v]
        if differ:
            raise ValueError(f"loader state is for a different sample order ({'; '.join(differ)})")
        self.epoch, self.batch = state["epoch"], state["batch"]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, first = self._position()
        self.epoch, self.batch = epoch, first
        ready: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            try:
                for item in self._batches(epoch, first):
                    if not put(item):
                        return
                put(_END)
            except BaseException as e:  # handed to the consumer, which raises it
                put(e)

        thread = threading.Thread(target=produce, name="ShardLoader", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                self.batch += 1
                yield item
            self.epoch, self.batch = self.epoch + 1, 0
        finally:
            stop.set()
            thread.join()

    def _batches(self, epoch: int, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shuffle:
            order = torch.randperm(len(self.shards), generator=_generator("shards", self.seed, epoch)).tolist()
        else:
            order = list(range(len(self.shards)))
        offsets = np.cumsum([0] + [self.shards[s].count for s in order]).tolist()
        used = len(self) * self.batch_size if self.drop_last else self.share
        per_window = self.window // self.batch_size
        windows = range(first // per_window, math.ceil(used / self.window))

        def spans(w: int) -> list[tuple[int, int, int]]:
            """Window w as (shard, first row, end row) runs of the epoch's shard order."""
            if w not in windows:
                return []
            lo = self.start + w * self.window
            hi = min(lo + self.window, self.start + used)
            runs = []
            for i, shard in enumerate(order):
                a, b = max(lo, offsets[i]), min(hi, offsets[i + 1])
                if a < b:
                    runs.append((shard, a - offsets[i], b - offsets[i]))
            return runs

        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ShardLoader-read")
        reads: dict[int, Future] = {}
        try:
            for w in windows:
                # Read this window's shards and, in the background, the next one's.
                needed = spans(w) + spans(w + 1)
                for shard, _, _ in needed:
                    if shard not in reads:
                        reads[shard] = pool.submit(self.dataset.read_shard, self.shards[shard])
                reads = {s: f for s, f in reads.items() if s in {n[0] for n in needed}}
                parts = [(reads[s].result(), a, b) for s, a, b in spans(w)]
                labels = torch.cat([lab[a:b] for (_, lab), a, b in parts])
                if self.dataset.manifest.encoding == "png":
                    images = [data for (img, _), a, b in parts for data in img[a:b]]
                else:
                    images = torch.cat([img[a:b] for (img, _), a, b in parts])
                if self.shuffle:
                    perm = torch.randperm(len(labels), generator=_generator("window", self.seed, epoch, self.rank, w))
                else:
                    perm = torch.arange(len(labels))
                for b in range(max(first - w * per_window, 0), math.ceil(len(labels) / self.batch_size)):
                    index = perm[b * self.batch_size : (b + 1) * self.batch_size]
                    yield self._batch(images, labels, index, epoch, w * per_window + b, pool)
            # A share one sample short of the longest can need one batch fewer; an empty
            # batch keeps the ranks in step (under FSDP every forward is a collective).
            if first < len(self) and math.ceil(self.share / self.batch_size) < len(self):
                yield torch.empty(0, *self.dataset.manifest.shape), torch.empty(0, dtype=torch.int64)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _batch(self, images, labels, index: torch.Tensor, epoch: int, number: int, pool: ThreadPoolExecutor):
        if isinstance(images, list):
            shape = self.dataset.manifest.shape
            pixels = torch.stack(list(pool.map(lambda i: decode_png(images[i], shape), index.tolist())))
        else:
            pixels = images[index]
        x = pixels.float().div_(255)
        if self.augment is not None:
            x = self.augment(x, _generator("augment", self.seed, epoch, self.rank, number))
        return x, labels[index]
