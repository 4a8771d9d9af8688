"""Converters to the LipScale shard format, and `lipscale data convert`.

    lipscale data convert digits ./data/digits
    lipscale data convert shapes s3://bucket/shapes --train 1000000
    lipscale data convert cifar10 cifar-10-python.tar.gz ./data/cifar10
    lipscale data convert tinyimagenet tiny-imagenet-200.zip ./data/tinyimagenet
    lipscale data convert imagenet /datasets/imagenet ./data/imagenet --workers 16

Each converter reads and checks its whole source layout (and, where it fits
in memory, every value) before anything is written, so bad input gets an
error naming the file and leaves DEST alone. Nothing is downloaded: SOURCE
is a local path or any fsspec URI.
"""

import hashlib
import io
import json
import logging
import pickle
import tarfile
import zipfile
import zlib
from functools import partial

import fsspec
import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from lipnext.data import DataError
from lipscale.data.catalog import CIFAR, CLASS_FOLDERS, CONVERTERS, SHARD_SIZE
from lipscale.data.parts import Part, Plan
from lipscale.data.shapes import ShapesConfig, shapes_plan
from lipscale.data.shards import content_key, write_dataset

log = logging.getLogger(__name__)

DIGITS_TRAIN = 1500
"""scikit-learn's 1797 digits, shuffled with seed 0 (the file is ordered by writer): 1500 train, 297 test."""


def _chunks(images: np.ndarray, labels: np.ndarray, size: int, name: str) -> list[Part]:
    """Parts for data already in memory; the key is the content itself."""
    return [
        Part(
            f"{name} {content_key(images[i : i + size], labels[i : i + size])}",
            len(labels[i : i + size]),
            partial(_given, images[i : i + size], labels[i : i + size]),
        )
        for i in range(0, len(labels), size)
    ]


def _given(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return images, labels


def digits_plan(shard_size: int = SHARD_SIZE) -> Plan:
    """scikit-learn's bundled 8x8 digits (values 0..16 scaled to 0..255): the offline default."""
    d = load_digits()
    perm = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(0)).numpy()
    images = np.round(d.images[perm] * 255 / 16).astype(np.uint8)[:, None]
    labels = d.target[perm].astype(np.int64)
    splits = {
        "train": _chunks(images[:DIGITS_TRAIN], labels[:DIGITS_TRAIN], shard_size, "digits"),
        "test": _chunks(images[DIGITS_TRAIN:], labels[DIGITS_TRAIN:], shard_size, "digits"),
    }
    return Plan("digits", (1, 8, 8), tuple(str(k) for k in range(10)), "raw", splits)


# --- CIFAR: the official python tarballs -------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR pickles hold dicts of lists and numpy arrays; any other class
    in them is refused (unpickling can otherwise run arbitrary code)."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def cifar_plan(name: str, source: str, shard_size: int = SHARD_SIZE) -> Plan:
    """CIFAR-10 or CIFAR-100 (fine labels) from the official python tarball, read whole and checked."""
    layout = CIFAR[name]
    members = {f"{layout['folder']}/{m}" for m in layout["train"] + layout["test"] + [layout["meta"]]}
    found = _read_tar_members(source, members)
    missing = sorted(members - found.keys())
    if missing:
        raise DataError(f"{source}: missing {missing[0]} (not the official {name} python tarball?)")
    meta = _unpickle(source, found, f"{layout['folder']}/{layout['meta']}")
    classes = meta.get(layout["names"]) if isinstance(meta, dict) else None
    if not isinstance(classes, list) or not classes:
        raise DataError(f"{source}:{layout['folder']}/{layout['meta']}: wrong schema: no list {layout['names']!r}")
    classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in classes)
    splits = {}
    for split in ("train", "test"):
        batches = [
            _cifar_batch(source, found, f"{layout['folder']}/{m}", layout["labels"], len(classes))
            for m in layout[split]
        ]
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        splits[split] = _chunks(images, labels, shard_size, name)
    return Plan(name, (3, 32, 32), classes, "raw", splits)


def _read_tar_members(source: str, wanted: set[str]) -> dict[str, bytes]:
    try:
        with fsspec.open(source, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            return {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and m.name in wanted}
    except FileNotFoundError:
        raise DataError(f"{source}: missing") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{source}: corrupt: not a readable tar archive ({e})") from e


def _unpickle(source: str, found: dict[str, bytes], member: str):
    try:
        return _ArrayUnpickler(io.BytesIO(found[member]), encoding="bytes").load()
    except Exception as e:  # a damaged pickle can raise almost anything
        raise DataError(f"{source}:{member}: corrupt: not a readable pickle ({type(e).__name__}: {e})") from e


def _cifar_batch(source: str, found: dict, member: str, label_key: bytes, num_classes: int):
    batch = _unpickle(source, found, member)
    where = f"{source}:{member}"
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{where}: wrong schema: expected a dict with b'data' and {label_key!r}, found {keys}")
    data, labels = batch[b"data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: wrong schema: b'data' must be uint8 (n, 3072), found {getattr(data, 'shape', data)}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: wrong schema: {label_key!r} must be {len(data)} integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise DataError(f"{where}: label {bad} out of range [0, {num_classes})")
    # Rows are 1024 red, 1024 green, 1024 blue values, row-major: already C, H, W.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


# --- Tiny-ImageNet and ImageNet: class folders, in a folder or an archive ----------------

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _archive_kind(source: str) -> str:
    lower = source.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith(".tar"):
        return "tar"
    if lower.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise DataError(
            f"{source}: a compressed tar cannot be read in shuffled order; extract it, or repack it as .tar or .zip"
        )
    return "folder"


def _list_source(source: str, kind: str) -> dict[str, tuple[int, object]]:
    """Relative member name -> (size, locator for _read_members)."""
    try:
        if kind == "folder":
            fs, root = fsspec.core.url_to_fs(source)
            if not fs.isdir(root):
                raise FileNotFoundError(source)
            return {p[len(root.rstrip("/")) + 1 :]: (e["size"], p) for p, e in fs.find(root, detail=True).items()}
        with fsspec.open(source, "rb") as f:
            if kind == "zip":
                return {i.filename: (i.file_size, i.filename) for i in zipfile.ZipFile(f).infolist() if not i.is_dir()}
            with tarfile.open(fileobj=f, mode="r:") as tar:
                return {m.name: (m.size, (m.offset_data, m.size)) for m in tar if m.isfile()}
    except FileNotFoundError:
        raise DataError(f"{source}: missing") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise DataError(f"{source}: corrupt: not a readable {kind} ({e})") from e


def _read_members(source: str, kind: str, locators: list) -> list[bytes]:
    if kind == "folder":
        fs, _ = fsspec.core.url_to_fs(source)
        return [fs.cat_file(path) for path in locators]
    with fsspec.open(source, "rb") as f:
        if kind == "zip":
            archive = zipfile.ZipFile(f)
            return [archive.read(name) for name in locators]
        out = []
        for offset, size in locators:  # an uncompressed tar: seek straight to each member
            f.seek(offset)
            out.append(f.read(size))
        return out


def _class_folder(name: str, prefix: str, split: str) -> str | None:
    """The class of an image member <prefix><split>/<class>/.../<file>, else None."""
    parts = name[len(prefix) :].split("/")
    if len(parts) >= 3 and parts[0] == split and name.lower().endswith(IMAGE_SUFFIXES):
        return parts[1]
    return None


def _find_layout(source: str, members: dict) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """(train class -> its member names, [(test member, class name)])."""
    prefix = ""
    tops = {name.split("/", 1)[0] for name in members if "/" in name}
    if not any(name.startswith("train/") for name in members) and len(tops) == 1:
        prefix = f"{tops.pop()}/"  # e.g. tiny-imagenet-200/
    train: dict[str, list[str]] = {}
    for name in sorted(members):
        if (cls := _class_folder(name, prefix, "train")) is not None:
            train.setdefault(cls, []).append(name)
    if not train:
        raise DataError(f"{source}: missing train/ (expected train/<class>/<image> and val/<class>/<image>)")
    annotations = f"{prefix}val/val_annotations.txt"
    if annotations in members:  # Tiny-ImageNet: val/images/<file> with labels in a table
        text = _read_members(source, _archive_kind(source), [members[annotations][1]])[0].decode()
        test = []
        for line in text.splitlines():
            if line.strip():
                file, cls = line.split("\t")[:2]
                test.append((f"{prefix}val/images/{file}", cls))
        missing = [name for name, _ in test if name not in members]
        if missing:
            raise DataError(f"{source}: missing {missing[0]} (listed in {annotations})")
    else:
        test = [(name, cls) for name in sorted(members) if (cls := _class_folder(name, prefix, "val")) is not None]
    if not test:
        raise DataError(f"{source}: missing val/ (expected val/<class>/<image> or val/val_annotations.txt)")
    unknown = sorted({cls for _, cls in test} - train.keys())
    if unknown:
        where = annotations if annotations in members else f"{prefix}val/{unknown[0]}"
        raise DataError(
            f"{source}:{where}: class {unknown[0]!r} out of range: not among the {len(train)} train classes"
        )
    return train, test


def class_subset(classes: tuple[str, ...], count: int, seed: int) -> tuple[str, ...]:
    """`count` of the sorted `classes`, drawn as LiResNet's code draws its ImageNet subsets
    (torch.manual_seed(seed); torch.randperm(len(classes))[:count]) and kept in increasing
    class order, so labels 0..count-1 follow the original order: with 1000 ImageNet classes,
    count 400 and seed 2023, the paper's 400-class subset."""
    if not 1 <= count <= len(classes):
        raise ValueError(f"classes: {count} is not between 1 and the source's {len(classes)} classes")
    chosen = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))[:count]
    return tuple(classes[i] for i in sorted(chosen.tolist()))


def class_folder_plan(
    name: str, source: str, size: int, encoding: str, shard_size: int, seed: int = 0,
    classes: int | None = None, class_seed: int = 2023,
) -> Plan:  # fmt: skip
    """Class folders train/<class>/**/<image> and val/<class>/**/<image> (or
    Tiny-ImageNet's val/images + val_annotations.txt), in a folder, a .zip or an
    uncompressed .tar, possibly under one top folder. Images are resized so the
    shorter side is `size`, centre-cropped to size x size, and written in a
    seeded shuffled order, so each shard holds every class. With `classes`, only
    that many classes, drawn by class_subset(class_seed); the manifest lists them."""
    kind = _archive_kind(source)
    members = _list_source(source, kind)
    train, test = _find_layout(source, members)
    names = tuple(sorted(train))
    classes = names if classes is None else class_subset(names, classes, class_seed)
    kept = set(classes)
    test = [(m, cls) for m, cls in test if cls in kept]
    label = {cls: i for i, cls in enumerate(classes)}
    samples = {
        "train": [(m, label[cls]) for cls in classes for m in train[cls]],
        "test": [(m, label[cls]) for m, cls in test],
    }
    rng = np.random.default_rng(seed)
    splits = {}
    for split, items in samples.items():
        items = [items[i] for i in rng.permutation(len(items))]
        splits[split] = []
        for start in range(0, len(items), shard_size):
            chunk = items[start : start + shard_size]
            key = json.dumps([name, size, encoding, [(m, members[m][0], y) for m, y in chunk]])
            load = partial(
                _load_images, source, kind, [(m, members[m][1]) for m, _ in chunk], [y for _, y in chunk], size
            )
            splits[split].append(Part(hashlib.sha256(key.encode()).hexdigest(), len(chunk), load))
    return Plan(name, (3, size, size), classes, encoding, splits)


def _load_images(source: str, kind: str, entries: list, labels: list[int], size: int):
    images = np.empty((len(entries), 3, size, size), np.uint8)
    for i, ((name, _), data) in enumerate(zip(entries, _read_members(source, kind, [loc for _, loc in entries]))):
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for damaged files
            raise DataError(f"{source}:{name}: corrupt image ({e})") from e
        images[i] = np.asarray(_fit(image, size)).transpose(2, 0, 1)
    return images, np.array(labels, np.int64)


def _fit(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (antialiased), then the centre size x size."""
    w, h = image.size
    scale = size / min(w, h)
    if scale != 1:
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


# --- the registry ------------------------------------------------------------------------

def plan(name: str, source: str | None = None, shard_size: int | None = None, **options) -> Plan:
    """The checked plan of converter `name`; `options` are its own (see the CLI)."""
    if name == "digits":
        return digits_plan(shard_size or SHARD_SIZE)
    if name == "shapes":
        return shapes_plan(ShapesConfig(**options), shard_size or SHARD_SIZE)
    if source is None:
        raise ValueError(f"{name} needs a SOURCE")
    if name in CIFAR:
        return cifar_plan(name, source, shard_size or SHARD_SIZE)
    if name in CLASS_FOLDERS:
        size, encoding, default_shards = CLASS_FOLDERS[name]
        options = {"size": size, "encoding": encoding} | options
        return class_folder_plan(name, source, shard_size=shard_size or default_shards, **options)
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(CONVERTERS)}")


def convert(name: str, source: str | None, dest: str, workers: int = 1, **options):
    """Checks the source, then writes (or completes) the dataset at `dest`; returns its manifest."""
    return write_dataset(plan(name, source, **options), dest, workers=workers)


def convert_command(args) -> int:
    """`lipscale data convert NAME ...` (its arguments: lipscale.cli)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = {k: getattr(args, k) for k in args.options}
    try:
        manifest = convert(
            args.name, getattr(args, "source", None), args.dest, args.workers, shard_size=args.shard_size, **options
        )
    except (DataError, ValueError) as e:
        log.error("%s", e)
        return 1
    counts = ", ".join(f"{split} {manifest.count(split)}" for split in manifest.splits)
    print(f"{args.dest}: {manifest.name}, {len(manifest.classes)} classes, {counts}")
    return 0
