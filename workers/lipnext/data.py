"""Reading LipScale datasets: Parquet shards plus a manifest, from any fsspec URI.

    <root>/manifest.json                  shape, classes, mean/std, and per split its shards
    <root>/<split>/part-00000.parquet     columns image (raw uint8 CHW bytes or PNG), label (int)

Local paths, file:// and s3:// (s3fs; it honours AWS_ENDPOINT_URL) all work.
The manifest is written last (lipscale.data.shards), so a dataset without one
is unfinished. Every shard is checked against the manifest before its samples
are used: size on open, then checksum, schema, row count and label range on
read; a mismatch raises DataError naming the file.

ShardLoader gives each of N ranks a disjoint share of a split, reshuffled per
epoch from a seed, and resumes mid-epoch from its state_dict. Shares are
contiguous runs of the (shuffled) shard order, so a rank reads about 1/N of
the shards.
"""

import hashlib
import io
import json
import math
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from lipnext.augment import AUGMENTATIONS

FORMAT = "lipscale-shards/1"
MANIFEST = "manifest.json"
ENCODINGS = ("raw", "png")


class DataError(Exception):
    """A dataset file is missing, malformed or disagrees with the manifest; the message starts with the file."""


@dataclass(frozen=True)
class Shard:
    path: str
    """Relative to the dataset root, e.g. 'train/part-00000.parquet'."""
    count: int
    """Rows (samples) in the shard."""
    size: int
    """File size in bytes: a listing checks it for every shard at open."""
    sha256: str
    """Hex digest of the whole file, checked when the shard is read."""


@dataclass(frozen=True)
class Manifest:
    name: str
    """The converter that wrote the dataset, e.g. 'cifar10'."""
    shape: tuple[int, int, int]
    """(C, H, W) of every image."""
    classes: tuple[str, ...]
    """Class names; labels index this tuple."""
    encoding: str
    """'raw': the image column holds C*H*W uint8 bytes, CHW order; 'png': PNG files."""
    mean: tuple[float, ...]
    """Per-channel pixel mean of the train split, pixels in [0, 1]."""
    std: tuple[float, ...]
    """Per-channel pixel std of the train split."""
    splits: dict[str, tuple[Shard, ...]]
    """Split name ('train', 'test') -> its shards in order."""

    def count(self, split: str) -> int:
        return sum(shard.count for shard in self.shards(split))

    def shards(self, split: str) -> tuple[Shard, ...]:
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; this dataset has {', '.join(self.splits)}")
        return self.splits[split]

    @property
    def image_schema(self) -> pa.DataType:
        return pa.binary(math.prod(self.shape)) if self.encoding == "raw" else pa.binary()

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        """Parses and checks a manifest; `where` names the file in errors."""
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format must be {FORMAT!r}, got {raw.get('format')!r}")
            manifest = cls(
                name=raw["name"],
                shape=tuple(raw["shape"]),
                classes=tuple(raw["classes"]),
                encoding=raw["encoding"],
                mean=tuple(raw["mean"]),
                std=tuple(raw["std"]),
                splits={split: tuple(Shard(**s) for s in shards) for split, shards in raw["splits"].items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise DataError(f"{where}: not a valid dataset manifest: {type(e).__name__}: {e}") from e
        problems = manifest._problems()
        if problems:
            raise DataError(f"{where}: {'; '.join(problems)}")
        return manifest

    def _problems(self) -> list[str]:
        if len(self.shape) != 3 or not all(isinstance(d, int) and d > 0 for d in self.shape):
            return [f"shape must be three positive integers (C, H, W), got {list(self.shape)}"]
        out = []
        if self.encoding not in ENCODINGS:
            out.append(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not self.classes:
            out.append("classes is empty")
        if len(self.mean) != self.shape[0] or len(self.std) != self.shape[0]:
            out.append(f"mean and std need one value per channel ({self.shape[0]})")
        if not self.splits:
            out.append("no splits")
        for split, shards in self.splits.items():
            if not shards:
                out.append(f"split {split!r} has no shards")
            out += [f"{s.path}: count must be positive" for s in shards if s.count < 1]
        return out


@dataclass(frozen=True)
class Dataset:
    """An opened dataset: its manifest, checked against the shard listing."""

    uri: str
    manifest: Manifest
    fs: fsspec.AbstractFileSystem
    root: str

    def url(self, path: str) -> str:
        return f"{self.uri.rstrip('/')}/{path}"

    def read_shard(self, shard: Shard) -> tuple[torch.Tensor | list[bytes], torch.Tensor]:
        """The shard's images (uint8 (n, C, H, W), or PNG bytes) and int64 labels, after every check."""
        where = self.url(shard.path)
        try:
            data = self.fs.cat_file(f"{self.root}/{shard.path}")
        except FileNotFoundError:
            raise DataError(f"{where}: missing (listed in {MANIFEST})") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise DataError(f"{where}: corrupt: sha256 {digest[:12]}... but {MANIFEST} says {shard.sha256[:12]}...")
        try:
            table = pq.read_table(pa.BufferReader(data))
        except pa.ArrowException as e:
            raise DataError(f"{where}: corrupt: not a readable Parquet file: {e}") from e
        return self._check(table, where, shard.count)

    def _check(self, table: pa.Table, where: str, count: int):
        m = self.manifest
        image_type = table.schema.field("image").type if "image" in table.column_names else None
        label_type = table.schema.field("label").type if "label" in table.column_names else None
        png_ok = m.encoding == "png" and image_type in (pa.binary(), pa.large_binary())
        if not (image_type == m.image_schema or png_ok) or label_type is None or not pa.types.is_integer(label_type):
            found = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
            raise DataError(
                f"{where}: wrong schema: expected image: {m.image_schema}, label: an integer; found {found}"
            )
        if table.num_rows != count:
            raise DataError(f"{where}: has {table.num_rows} rows but {MANIFEST} says {count}")
        labels, images = table.column("label"), table.column("image").combine_chunks()
        if labels.null_count or images.null_count:
            raise DataError(f"{where}: {labels.null_count} missing labels and {images.null_count} missing images")
        low, high = (v.as_py() for v in pc.min_max(labels).values())
        if low < 0 or high >= len(m.classes):
            raise DataError(f"{where}: label {low if low < 0 else high} out of range [0, {len(m.classes)})")
        labels = torch.from_numpy(labels.to_numpy().astype(np.int64))
        if m.encoding == "png":
            pngs = images.to_pylist()
            for i, data in enumerate(pngs):  # headers only: ~20 us each
                try:
                    size = Image.open(io.BytesIO(data)).size
                except (OSError, SyntaxError) as e:
                    raise DataError(f"{where}: corrupt: image {i} is not a readable PNG ({e})") from e
                if size != (m.shape[2], m.shape[1]):
                    raise DataError(
                        f"{where}: image {i} is {size[0]}x{size[1]}, {MANIFEST} says {m.shape[2]}x{m.shape[1]}"
                    )
            return pngs, labels
        # A fixed-size binary array is one contiguous buffer: (n, C, H, W) without a copy per image.
        width = images.type.byte_width
        buffer = np.frombuffer(images.buffers()[1], np.uint8)[images.offset * width : (images.offset + count) * width]
        return torch.from_numpy(buffer.reshape(count, *m.shape).copy()), labels


def decode_png(data: bytes, shape: tuple[int, int, int]) -> torch.Tensor:
    image = Image.open(io.BytesIO(data))
    image = image.convert("L" if shape[0] == 1 else "RGB")
    array = np.asarray(image).reshape(shape[1], shape[2], shape[0])
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def open_dataset(uri: str, **storage_options) -> Dataset:
    """Opens the dataset at `uri`: reads its manifest and checks that every
    shard it lists exists with the recorded size (one listing per split)."""
    fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    root = root.rstrip("/")
    where = f"{uri.rstrip('/')}/{MANIFEST}"
    try:
        text = fs.cat_file(f"{root}/{MANIFEST}").decode()
    except FileNotFoundError:
        raise DataError(f"{where}: missing: no dataset here (write one with `lipscale data convert`)") from None
    manifest = Manifest.from_json(text, where)
    dataset = Dataset(uri, manifest, fs, root)
    shards = [shard for split in manifest.splits.values() for shard in split]
    sizes = {}
    for folder in sorted({f"{root}/{shard.path}".rsplit("/", 1)[0] for shard in shards}):
        try:
            sizes.update((e["name"].rstrip("/"), e["size"]) for e in fs.ls(folder, detail=True, refresh=True))
        except FileNotFoundError:
            pass
    for shard in shards:
        size = sizes.get(f"{root}/{shard.path}")
        if size is None:
            raise DataError(f"{dataset.url(shard.path)}: missing (listed in {MANIFEST})")
        if size != shard.size:
            raise DataError(f"{dataset.url(shard.path)}: {size} bytes but {MANIFEST} says {shard.size}")
    return dataset


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
