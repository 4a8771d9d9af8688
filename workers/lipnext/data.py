"""The LipScale dataset format: Parquet shards plus a manifest, read from any fsspec URI.

    <root>/manifest.json                  shape, classes, mean/std, and per split its shards
    <root>/<split>/part-00000.parquet     columns image (raw uint8 CHW bytes or PNG), label (int)

Local paths, file:// and s3:// (s3fs; it honours AWS_ENDPOINT_URL) all work.
The manifest is written last (lipscale.data.shards), so a dataset without one
is unfinished. Every shard is checked against the manifest before its samples
are used: size on open, then checksum, schema, row count and label range on
read; a mismatch raises DataError naming the file.

Batches for training come from lipnext.loader.ShardLoader, which reads
shards through `Dataset.read_shard`.
"""

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

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
