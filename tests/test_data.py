"""Reading datasets: the manifest checks, the rank-aware loader, local and S3."""

import hashlib
import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from servers import s3_server  # noqa: F401 (a fixture)

from lipnext.data import DataError, open_dataset
from lipnext.loader import ShardLoader
from lipscale.data.convert import convert
from lipscale.data.shards import Part, Plan, content_key, write_dataset

SHARD_COUNTS = [10] * 10 + [3]  # 103 samples; the short last shard makes shares uneven


def _numbered_part(first: int, count: int) -> Part:
    ids = np.arange(first, first + count)
    images = np.zeros((count, 1, 2, 2), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids // 256, ids % 256
    labels = ids % 3
    return Part(content_key(images, labels), count, lambda: (images, labels))


@pytest.fixture
def numbered(tmp_path):
    """103 samples in 11 shards; a sample's id is written in its first two pixels."""
    starts = np.cumsum([0] + SHARD_COUNTS[:-1])
    parts = [_numbered_part(int(s), n) for s, n in zip(starts, SHARD_COUNTS)]
    plan = Plan("numbered", (1, 2, 2), ("a", "b", "c"), "raw", {"train": parts, "test": parts[:1]})
    write_dataset(plan, str(tmp_path / "numbered"))
    return open_dataset(str(tmp_path / "numbered"))


def ids(batches) -> list[int]:
    pixels = torch.cat([x for x, _ in batches]).mul(255).round().long()
    return (pixels[:, 0, 0, 0] * 256 + pixels[:, 0, 0, 1]).tolist()


@pytest.fixture
def digits_root(tmp_path):
    root = tmp_path / "digits"
    convert("digits", None, str(root))
    return root


def test_digits_round_trip_matches_the_shared_test_split(digits_root, digits):
    (x_train, y_train), (x_test, y_test) = digits
    dataset = open_dataset(str(digits_root))
    assert dataset.manifest.shape == (1, 8, 8) and dataset.manifest.classes == tuple("0123456789")
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        batches = list(ShardLoader(dataset, split, 128, shuffle=False))
        images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert torch.equal(labels, y)
        assert (images - x).abs().max() <= 0.5 / 255 + 1e-6  # stored as round(v * 255 / 16)
    assert dataset.manifest.mean[0] == pytest.approx(x_train.mean().item(), abs=1e-3)
    assert dataset.manifest.std[0] == pytest.approx(x_train.std().item(), abs=1e-3)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shares_are_disjoint_and_complete(numbered, world):
    for epoch in (0, 1):
        shares = []
        for rank in range(world):
            loader = ShardLoader(numbered, "train", 8, rank=rank, world_size=world, seed=1, shuffle_window=20)
            loader.set_epoch(epoch)
            shares.append(ids(loader))
        assert sorted(i for share in shares for i in share) == list(range(103))  # complete, and no sample twice
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_every_rank_yields_the_same_number_of_batches(numbered):
    # 103 samples on 2 ranks in batches of 17: shares of 52 and 51 would need 4 and 3 batches.
    ranks = [list(ShardLoader(numbered, "train", 17, rank=r, world_size=2)) for r in range(2)]
    assert [len(batches) for batches in ranks] == [4, 4]
    assert [len(y) for _, y in ranks[1]] == [17, 17, 17, 0]
    assert ranks[1][-1][0].shape == (0, 1, 2, 2)
    resumed = ShardLoader(numbered, "train", 17, rank=1, world_size=2)
    resumed.load_state_dict({**resumed.state_dict(), "batch": 3})
    assert [len(y) for _, y in resumed] == [0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_drop_last_gives_every_rank_the_same_full_batches(numbered, world):
    loaders = [ShardLoader(numbered, "train", 8, rank=r, world_size=world, drop_last=True) for r in range(world)]
    shares = [list(loader) for loader in loaders]
    steps = 103 // world // 8
    assert [len(share) for share in shares] == [steps] * world == [len(loader) for loader in loaders]
    assert all(len(y) == 8 for share in shares for _, y in share)
    seen = [i for share in shares for i in ids(share)]
    assert len(set(seen)) == len(seen) == world * steps * 8


def test_shuffling_is_deterministic_per_seed_and_changes_every_epoch(numbered):
    def order(seed, epoch):
        loader = ShardLoader(numbered, "train", 8, seed=seed, shuffle_window=20)
        loader.set_epoch(epoch)
        return ids(loader)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert ids(ShardLoader(numbered, "train", 8, shuffle=False)) == list(range(103))


def test_a_full_pass_moves_on_to_the_next_epoch(numbered):
    loader = ShardLoader(numbered, "train", 8, seed=2)
    first, second = ids(loader), ids(loader)
    assert loader.epoch == 2 and first != second and sorted(first) == sorted(second)


@pytest.mark.parametrize("augment", [None, "crop_flip"])
def test_resume_mid_epoch_yields_exactly_the_remaining_samples(numbered, augment):
    def loader():
        return ShardLoader(numbered, "train", 8, rank=1, world_size=2, seed=3, shuffle_window=20, augment=augment)

    full = list(loader())  # 7 batches, across three shuffle windows
    interrupted = loader()
    for i, _ in enumerate(interrupted):
        if i == 3:  # a checkpoint taken while training on batch 3
            break
    state = interrupted.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 4
    for (x, y), (x_full, y_full) in zip(rest, full[4:]):
        assert torch.equal(x, x_full) and torch.equal(y, y_full)
    if augment is None:
        assert ids(rest) == ids(full[4:])


def test_a_state_saved_after_the_last_batch_resumes_at_the_next_epoch(numbered):
    loader = ShardLoader(numbered, "train", 8, seed=4)
    for _ in loader:
        state = loader.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 0)
    resumed = ShardLoader(numbered, "train", 8, seed=4)
    resumed.load_state_dict(state)
    expected = ShardLoader(numbered, "train", 8, seed=4)
    expected.set_epoch(1)
    assert ids(resumed) == ids(expected)


def test_a_state_from_another_sample_order_is_refused(numbered):
    state = ShardLoader(numbered, "train", 8, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size: 2 != 3"):
        ShardLoader(numbered, "train", 8, world_size=3).load_state_dict(state)


def test_a_rank_reads_only_the_shards_of_its_share(numbered):
    # Rank 0 of 3 without shuffling owns samples 0..34, in shards 0..3; the rest may vanish.
    for shard in numbered.manifest.shards("train")[4:]:
        numbered.fs.rm(f"{numbered.root}/{shard.path}")
    assert ids(ShardLoader(numbered, "train", 8, world_size=3, shuffle=False)) == list(range(35))
    with pytest.raises(DataError, match="part-00004.parquet: missing"):
        list(ShardLoader(numbered, "train", 8, rank=1, world_size=3, shuffle=False))


def test_stopping_early_stops_the_prefetch_thread(numbered):
    loader = ShardLoader(numbered, "train", 4, prefetch=2)
    for _ in zip(range(2), loader):
        pass
    assert not [t for t in threading.enumerate() if t.name.startswith("ShardLoader")]


# --- bad datasets: a clear error naming the file, and nothing written -------------------


def _rewrite_shard(root, path: str, table: pa.Table, **manifest_changes):
    """Replaces a shard as a foreign writer might, keeping manifest.json consistent with its bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    (root / path).write_bytes(data)
    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["splits"][path.split("/")[0]]:
        if shard["path"] == path:
            shard.update(size=len(data), sha256=hashlib.sha256(data).hexdigest(), **manifest_changes)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _table(root, path: str) -> pa.Table:
    return pq.read_table(root / path)


def _flip_a_byte(root):
    data = bytearray((root / "test/part-00000.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "test/part-00000.parquet").write_bytes(bytes(data))


def _edit_manifest(root, edit):
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {
    "no manifest": (lambda root: (root / "manifest.json").unlink(), "manifest.json: missing"),
    "manifest not JSON": (lambda root: (root / "manifest.json").write_text("{"), "manifest.json: not a valid"),
    "manifest without classes": (
        lambda root: _edit_manifest(root, lambda m: m.pop("classes")),
        "manifest.json: not a valid dataset manifest: KeyError: 'classes'",
    ),
    "manifest with a bad shape": (
        lambda root: _edit_manifest(root, lambda m: m.update(shape=[1, 8])),
        r"manifest.json: shape must be three positive integers",
    ),
    "missing shard": (lambda root: (root / "test/part-00000.parquet").unlink(), "test/part-00000.parquet: missing"),
    "shard of another size": (
        lambda root: (root / "test/part-00000.parquet").open("ab").write(b"junk"),
        r"test/part-00000.parquet: \d+ bytes but manifest.json says \d+",
    ),
    "corrupt shard": (_flip_a_byte, "test/part-00000.parquet: corrupt: sha256"),
    "wrong schema": (
        lambda root: _rewrite_shard(
            root,
            "test/part-00000.parquet",
            _table(root, "test/part-00000.parquet").set_column(1, "label", pa.array(["x"] * 297)),
        ),
        r"test/part-00000.parquet: wrong schema: expected image: fixed_size_binary\[64\], label: an integer; "
        r"found image: fixed_size_binary\[64\], label: string",
    ),
    "label out of range": (
        lambda root: _rewrite_shard(
            root,
            "test/part-00000.parquet",
            _table(root, "test/part-00000.parquet").set_column(1, "label", pa.array(np.arange(297) % 11)),
        ),
        r"test/part-00000.parquet: label 10 out of range \[0, 10\)",
    ),
    "manifest disagrees on the count": (
        lambda root: _rewrite_shard(
            root, "test/part-00000.parquet", _table(root, "test/part-00000.parquet"), count=296
        ),
        "test/part-00000.parquet: has 297 rows but manifest.json says 296",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_bad_dataset_names_the_file_and_writes_nothing(digits_root, damage):
    harm, message = DAMAGE[damage]
    harm(digits_root)
    before = {p: p.read_bytes() for p in digits_root.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=message):
        list(ShardLoader(str(digits_root), "test", 100))
    assert {p: p.read_bytes() for p in digits_root.rglob("*") if p.is_file()} == before


# --- the same dataset from a local path, file:// and S3 ---------------------------------


def test_local_file_and_s3_copies_read_the_same(tmp_path, s3_server):  # noqa: F811
    uris = [str(tmp_path / "shapes"), f"file://{tmp_path}/shapes-file", f"{s3_server['uri']}/shapes"]
    for uri in uris:
        convert("shapes", None, uri, train=50, test=10, shard_size=16)
    runs = []
    for uri in uris:
        loaders = [ShardLoader(uri, "train", 8, rank=r, world_size=2, seed=5, augment="crop_flip") for r in range(2)]
        runs.append([batch for loader in loaders for batch in loader])
    for run in runs[1:]:
        assert len(run) == len(runs[0])
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run, runs[0]))
    s3 = open_dataset(uris[2])
    s3.fs.rm(f"{s3.root}/train/part-00001.parquet")
    with pytest.raises(DataError, match="s3://lipscale/shapes/train/part-00001.parquet: missing"):
        open_dataset(uris[2])
