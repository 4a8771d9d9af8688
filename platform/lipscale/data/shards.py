"""Writing LipScale datasets; the format and its reader are lipnext.data.

A converter checks its source and hands `write_dataset` a Plan
(lipscale.data.parts): per split, the Parts that become shards. Each shard is encoded in memory, uploaded under a
temporary name and renamed into place, and the manifest is written only after
every shard, so a reader never accepts a half-written dataset. A rerun keeps
every finished shard whose key matches the plan's.
"""

import hashlib
import io
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from lipnext.data import ENCODINGS, MANIFEST, DataError, Manifest, Shard
from lipscale.data.parts import Part, Plan

log = logging.getLogger(__name__)

_METADATA = b"lipscale"


def content_key(*arrays: np.ndarray) -> str:
    """A key for data already in memory: the hash of its bytes."""
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def write_dataset(plan: Plan, dest: str, workers: int = 1, **storage_options) -> Manifest:
    """Writes (or completes) the dataset of `plan` at `dest`; returns its manifest."""
    if plan.encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {plan.encoding!r}")
    fs, root = fsspec.core.url_to_fs(dest, **storage_options)
    root = root.rstrip("/")
    # Each job carries its own part only: a whole plan can hold a whole dataset in memory.
    jobs = [
        (fs, root, f"{split}/part-{i:05d}.parquet", part, plan.shape, len(plan.classes), plan.encoding)
        for split, parts in plan.splits.items()
        for i, part in enumerate(parts)
    ]
    # Shards may change below: until the new manifest is written, none must describe them.
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm(f"{root}/{MANIFEST}")
    results = []
    with tqdm(total=sum(job[3].count for job in jobs), unit="img", desc=f"{plan.name} -> {dest}") as progress:
        if workers > 1:
            # spawn: forked children would inherit the parent's threads (torch, s3fs event loop).
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for result in pool.map(_write_shard, *zip(*jobs)):
                    results.append(result)
                    progress.update(result[0].count)
        else:
            for job in jobs:
                results.append(_write_shard(*job))
                progress.update(results[-1][0].count)
    kept = sum(skipped for _, _, skipped in results)
    log.info("%s: wrote %d shards, kept %d finished ones", dest, len(results) - kept, kept)

    stats_split = "train" if "train" in plan.splits else next(iter(plan.splits))
    mean, std = _mean_std([stats for (_, stats, _), job in zip(results, jobs) if job[2].startswith(f"{stats_split}/")])
    shards = iter(shard for shard, _, _ in results)
    manifest = Manifest(
        name=plan.name,
        shape=plan.shape,
        classes=plan.classes,
        encoding=plan.encoding,
        mean=mean,
        std=std,
        splits={split: tuple(next(shards) for _ in parts) for split, parts in plan.splits.items()},
    )
    _put_atomic(fs, f"{root}/{MANIFEST}", manifest.to_json().encode())
    return manifest


def _put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes):
    """Upload under a temporary name, then rename: a reader sees the whole file or none."""
    folder, name = path.rsplit("/", 1)
    fs.makedirs(folder, exist_ok=True)
    temporary = f"{folder}/.{name}.tmp"
    fs.pipe_file(temporary, data)
    fs.mv(temporary, path)


def _finished(fs: fsspec.AbstractFileSystem, root: str, path: str, key: str) -> tuple[Shard, dict, bool] | None:
    """The shard at `path` if an earlier run finished it from the same key."""
    try:
        data = fs.cat_file(f"{root}/{path}")
        meta = json.loads(pq.read_metadata(pa.BufferReader(data)).metadata[_METADATA])
    except (FileNotFoundError, pa.ArrowException, KeyError, TypeError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    return Shard(path, meta["count"], len(data), hashlib.sha256(data).hexdigest()), meta["stats"], True


def _write_shard(
    fs, root: str, path: str, part: Part, shape: tuple[int, int, int], num_classes: int, encoding: str
) -> tuple[Shard, dict, bool]:
    """(shard, its pixel statistics, whether an earlier run had finished it)."""
    if (done := _finished(fs, root, path, part.key)) is not None:
        return done
    images, labels = part.load()
    where = f"{path} (from {part.key[:60]})"
    if images.dtype != np.uint8 or images.shape != (part.count, *shape):
        raise DataError(f"{where}: images are {images.dtype} {images.shape}, expected uint8 {(part.count, *shape)}")
    if len(labels) != part.count or labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{where}: labels must be {part.count} values in [0, {num_classes})")
    stats = _pixel_stats(images)
    if encoding == "raw":
        width = int(np.prod(shape))
        column = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width), part.count, [None, pa.py_buffer(images.tobytes())]
        )
    else:
        column = pa.array([encode_png(image) for image in images], pa.binary())
    meta = json.dumps({"key": part.key, "count": part.count, "stats": stats})
    table = pa.table({"image": column, "label": pa.array(labels, pa.int64())}).replace_schema_metadata(
        {_METADATA: meta}
    )
    sink = pa.BufferOutputStream()
    # PNG bytes do not compress further; raw pixels do, and zstd decodes at GB/s.
    pq.write_table(table, sink, compression="zstd" if encoding == "raw" else "none", use_dictionary=["label"])
    data = sink.getvalue().to_pybytes()
    _put_atomic(fs, f"{root}/{path}", data)
    return Shard(path, part.count, len(data), hashlib.sha256(data).hexdigest()), stats, False


def _pixel_stats(images: np.ndarray) -> dict:
    """Per channel: pixel count, sum and sum of squares of the 0..255 values, exact integers."""
    channels = [images[:, c].astype(np.uint32) for c in range(images.shape[1])]
    return dict(
        pixels=int(images[:, 0].size),
        sum=[int(ch.sum(dtype=np.uint64)) for ch in channels],
        sumsq=[int((ch * ch).sum(dtype=np.uint64)) for ch in channels],
    )


def _mean_std(stats: list[dict]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels = sum(s["pixels"] for s in stats)
    mean = sum(np.array(s["sum"], np.float64) for s in stats) / pixels / 255
    square = sum(np.array(s["sumsq"], np.float64) for s in stats) / pixels / 255**2
    std = np.sqrt(np.maximum(square - mean**2, 0.0))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (grey for C = 1, RGB for C = 3)."""
    hwc = image.transpose(1, 2, 0)
    out = io.BytesIO()
    Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(out, format="PNG")
    return out.getvalue()
