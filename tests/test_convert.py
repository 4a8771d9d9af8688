"""Converters: real inputs built here, round-tripped through the loader; bad
input is refused with the file named and nothing written."""

import io
import logging
import os
import pickle
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lipnext.data import DataError, open_dataset
from lipnext.loader import ShardLoader
from lipscale.cli import main
from lipscale.data.convert import convert, plan
from lipscale.data.parts import Part
from lipscale.data.shapes import ShapesConfig, shapes_plan
from lipscale.data.shards import write_dataset


def read_split(uri: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split in stored order, as uint8 images and labels."""
    batches = list(ShardLoader(uri, split, 64, shuffle=False))
    return torch.cat([x for x, _ in batches]).mul(255).round().byte(), torch.cat([y for _, y in batches])


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- CIFAR: the official python tarball layout ------------------------------------------


CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", 100),
}


def write_cifar(path: Path, name: str = "cifar10", per_batch: int = 12, change=None) -> dict[str, dict]:
    """A tarball laid out like the official python one (protocol-2 pickles of
    dicts with bytes keys); `change(batches)` may damage it first. Returns the batches."""
    folder, train, test, k = CIFAR_LAYOUT[name]
    rng = np.random.default_rng(0)
    batches = {}
    for member in train + [test]:
        batch = {b"batch_label": member.encode(), b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)}
        batch[b"filenames"] = [f"{member}_{i}.png".encode() for i in range(per_batch)]
        labels = rng.integers(0, k, per_batch).tolist()
        if name == "cifar10":
            batch[b"labels"] = labels
        else:
            batch[b"fine_labels"], batch[b"coarse_labels"] = labels, [y // 5 for y in labels]
        batches[member] = batch
    if name == "cifar10":
        batches["batches.meta"] = {b"label_names": [f"class{i}".encode() for i in range(k)], b"num_vis": 3072}
    else:
        names = [f"fine{i}".encode() for i in range(k)]
        batches["meta"] = {b"fine_label_names": names, b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}
    if change:
        change(batches)
    with tarfile.open(path, "w:gz") as tar:
        for member, batch in batches.items():
            data = batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return batches


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_tarball_round_trips(tmp_path, name):
    batches = write_cifar(tmp_path / "cifar.tar.gz", name)
    convert(name, str(tmp_path / "cifar.tar.gz"), str(tmp_path / name), shard_size=25)
    _, train, test, k = CIFAR_LAYOUT[name]
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    manifest = open_dataset(str(tmp_path / name)).manifest
    assert manifest.shape == (3, 32, 32) and len(manifest.classes) == k
    assert manifest.classes[:2] == (("class0", "class1") if name == "cifar10" else ("fine0", "fine1"))
    for split, members in (("train", train), ("test", [test])):
        images, labels = read_split(str(tmp_path / name), split)
        expected = np.concatenate([batches[m][b"data"] for m in members]).reshape(-1, 3, 32, 32)
        assert torch.equal(images, torch.from_numpy(expected))
        assert labels.tolist() == [y for m in members for y in batches[m][label_key]]
    pixels = np.concatenate([batches[m][b"data"] for m in train]).reshape(-1, 3, 1024) / 255
    assert manifest.mean == pytest.approx(pixels.mean(axis=(0, 2)), abs=1e-6)
    assert manifest.std == pytest.approx(pixels.std(axis=(0, 2)), abs=1e-6)


class RunsCode:
    """A pickled object that would run a shell command when loaded."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


def _set(member, key, value):
    return lambda batches: batches[member].__setitem__(key, value)


BAD_CIFAR = {
    "missing member": (lambda b: b.pop("data_batch_3"), "cifar.tar.gz: missing cifar-10-batches-py/data_batch_3"),
    "wrong schema": (
        lambda b: b["data_batch_2"].pop(b"labels"),
        "cifar-10-batches-py/data_batch_2: wrong schema: expected a dict with b'data' and b'labels'",
    ),
    "images of the wrong size": (
        _set("test_batch", b"data", np.zeros((12, 1024), np.uint8)),
        r"cifar-10-batches-py/test_batch: wrong schema: b'data' must be uint8 \(n, 3072\)",
    ),
    "label out of range": (
        _set("data_batch_1", b"labels", [10] * 12),
        r"cifar-10-batches-py/data_batch_1: label 10 out of range \[0, 10\)",
    ),
    "corrupt pickle": (
        lambda b: b.__setitem__("data_batch_4", b"\x80\x02}q\x00(X"),
        "cifar-10-batches-py/data_batch_4: corrupt: not a readable pickle",
    ),
    "pickle that runs code": (
        lambda b: b.__setitem__("data_batch_5", pickle.dumps(RunsCode())),
        "cifar-10-batches-py/data_batch_5: corrupt: .*refusing to load posix.system",
    ),
}


@pytest.mark.parametrize("bad", BAD_CIFAR)
def test_bad_cifar_input_names_the_file_and_writes_nothing(tmp_path, bad):
    change, message = BAD_CIFAR[bad]
    write_cifar(tmp_path / "cifar.tar.gz", change=change)
    with pytest.raises(DataError, match=message):
        convert("cifar10", str(tmp_path / "cifar.tar.gz"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_missing_or_truncated_tarball_names_the_file_and_writes_nothing(tmp_path):
    with pytest.raises(DataError, match="nowhere.tar.gz: missing"):
        convert("cifar10", str(tmp_path / "nowhere.tar.gz"), str(tmp_path / "out"))
    write_cifar(tmp_path / "cifar.tar.gz")
    data = (tmp_path / "cifar.tar.gz").read_bytes()
    (tmp_path / "cifar.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cifar.tar.gz: corrupt: not a readable tar archive"):
        convert("cifar10", str(tmp_path / "cifar.tar.gz"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --- class folders: Tiny-ImageNet and ImageNet ------------------------------------------


CLASSES = ("cat", "dog", "emu")


def write_class_tree(root: Path, size=(16, 16), per_class: int = 5, fmt: str = "PNG") -> dict[str, int]:
    """train/<class>/<i>.png and val/<class>/<i>.png of random pixels; returns {member: label}."""
    rng = np.random.default_rng(0)
    labels = {}
    for split, n in (("train", per_class), ("val", 2)):
        for y, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                member = f"{split}/{cls}/{i}.{fmt.lower()}"
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / member, format=fmt)
                labels[member] = y
    return labels


def source_pairs(root: Path, labels: dict[str, int], split: str) -> set[tuple[bytes, int]]:
    return {
        (np.asarray(Image.open(root / m).convert("RGB")).transpose(2, 0, 1).tobytes(), y)
        for m, y in labels.items()
        if m.startswith(split)
    }


def loaded_pairs(uri: str, split: str) -> set[tuple[bytes, int]]:
    images, labels = read_split(uri, split)
    return {(x.numpy().tobytes(), int(y)) for x, y in zip(images, labels)}


@pytest.mark.parametrize("name,encoding", [("tinyimagenet", "raw"), ("imagenet", "png")])
def test_class_folders_round_trip_in_shuffled_shards(tmp_path, name, encoding):
    labels = write_class_tree(tmp_path / "src")
    manifest = convert(name, str(tmp_path / "src"), str(tmp_path / "out"), size=16, shard_size=4)
    assert manifest.classes == CLASSES and manifest.encoding == encoding and manifest.shape == (3, 16, 16)
    assert [s.count for s in manifest.shards("train")] == [4, 4, 4, 3]
    for split, source_split in (("train", "train"), ("test", "val")):
        assert loaded_pairs(str(tmp_path / "out"), split) == source_pairs(tmp_path / "src", labels, source_split)
    _, train_labels = read_split(str(tmp_path / "out"), "train")
    assert train_labels.tolist() != sorted(train_labels.tolist())  # written shuffled, not class by class


def _zip(src: Path, path: Path, top: str = ""):
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, top + str(p.relative_to(src)))


def _tar(src: Path, path: Path, top: str = ""):
    with tarfile.open(path, "w") as t:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                t.add(p, top + str(p.relative_to(src)))


def test_a_folder_a_zip_and_a_tar_give_the_same_dataset(tmp_path):
    write_class_tree(tmp_path / "src")
    _zip(tmp_path / "src", tmp_path / "src.zip")
    _tar(tmp_path / "src", tmp_path / "src.tar", top="imagenet/")  # under one top folder
    for source in ("src", "src.zip", "src.tar"):
        convert("imagenet", str(tmp_path / source), str(tmp_path / f"out-{source}"), size=16)
    assert files(tmp_path / "out-src") == files(tmp_path / "out-src.zip")  # same member names, same bytes
    for split in ("train", "test"):
        folder, tar = read_split(str(tmp_path / "out-src"), split), read_split(str(tmp_path / "out-src.tar"), split)
        assert torch.equal(folder[0], tar[0]) and torch.equal(folder[1], tar[1])


def test_tinyimagenet_layout_with_val_annotations(tmp_path):
    """The official zip: train/<wnid>/images/*.JPEG, val/images/*.JPEG labelled by val_annotations.txt."""
    rng = np.random.default_rng(1)
    expected = {"train": set(), "test": set()}
    with zipfile.ZipFile(tmp_path / "tiny-imagenet-200.zip", "w") as z:

        def add(member, label, split):
            image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=90)
            z.writestr(f"tiny-imagenet-200/{member}", out.getvalue())
            decoded = np.asarray(Image.open(io.BytesIO(out.getvalue())).convert("RGB")).transpose(2, 0, 1)
            expected[split].add((decoded.tobytes(), label))

        rows = []
        for y, wnid in enumerate(("n01443537", "n01629819")):
            z.writestr(f"tiny-imagenet-200/train/{wnid}/{wnid}_boxes.txt", "ignored")
            for i in range(3):
                add(f"train/{wnid}/images/{wnid}_{i}.JPEG", y, "train")
            for i in range(2):
                add(f"val/images/val_{y}{i}.JPEG", y, "test")
                rows.append(f"val_{y}{i}.JPEG\t{wnid}\t0\t0\t63\t63")
        z.writestr("tiny-imagenet-200/val/val_annotations.txt", "\n".join(rows) + "\n")
        z.writestr("tiny-imagenet-200/wnids.txt", "n01443537\nn01629819\n")
        z.writestr("tiny-imagenet-200/test/images/test_0.JPEG", b"unlabelled: ignored")
    convert("tinyimagenet", str(tmp_path / "tiny-imagenet-200.zip"), str(tmp_path / "out"))
    assert open_dataset(str(tmp_path / "out")).manifest.classes == ("n01443537", "n01629819")
    for split in ("train", "test"):
        assert loaded_pairs(str(tmp_path / "out"), split) == expected[split]


def test_images_are_resized_on_the_short_side_and_centre_cropped(tmp_path):
    # 24x16 images: the short side is already 16, so the crop keeps the middle 16 columns.
    labels = write_class_tree(tmp_path / "src", size=(24, 16), per_class=1)
    convert("imagenet", str(tmp_path / "src"), str(tmp_path / "out"), size=16)
    middles = {
        (np.asarray(Image.open(tmp_path / "src" / m))[:, 4:20].transpose(2, 0, 1).tobytes(), y)
        for m, y in labels.items()
        if m.startswith("train")
    }
    assert loaded_pairs(str(tmp_path / "out"), "train") == middles
    convert("imagenet", str(tmp_path / "src"), str(tmp_path / "small"), size=8)
    assert read_split(str(tmp_path / "small"), "train")[0].shape == (3, 3, 8, 8)


def _corrupt_one_png(root: Path):
    path = root / "train/dog/3.png"
    path.write_bytes(path.read_bytes()[:60])


def _unknown_val_class(root: Path):
    (root / "val/yak").mkdir()
    (root / "val/cat/0.png").rename(root / "val/yak/0.png")


BAD_FOLDERS = {
    "missing source": (lambda root: None, "nowhere: missing", "nowhere"),
    "no train folder": (lambda root: (root / "train").rename(root / "training"), "src: missing train/", "src"),
    "no val folder": (lambda root: (root / "val").rename(root / "validation"), "src: missing val/", "src"),
    "val class out of range": (_unknown_val_class, "src:val/yak: class 'yak' out of range", "src"),
    "corrupt image": (_corrupt_one_png, "src:train/dog/3.png: corrupt image", "src"),
    "compressed tar": (
        lambda root: _tar(root, root.parent / "src.tar.gz"),
        "src.tar.gz: a compressed tar",
        "src.tar.gz",
    ),
}


@pytest.mark.parametrize("bad", BAD_FOLDERS)
def test_bad_class_folders_name_the_file_and_write_nothing(tmp_path, bad):
    change, message, source = BAD_FOLDERS[bad]
    write_class_tree(tmp_path / "src")
    change(tmp_path / "src")
    with pytest.raises(DataError, match=message):
        convert("imagenet", str(tmp_path / source), str(tmp_path / "out"), size=16)
    assert not (tmp_path / "out").exists()


# --- shapes, idempotence and interruption ------------------------------------------------

SMALL_SHAPES = ShapesConfig(train=60, test=20)


def test_shapes_same_seed_same_bytes(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_dataset(shapes_plan(replace(SMALL_SHAPES, seed=seed), shard_size=16), str(tmp_path / name))
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a")["train/part-00000.parquet"] != files(tmp_path / "c")["train/part-00000.parquet"]
    manifest = open_dataset(str(tmp_path / "a")).manifest
    assert manifest.shape == (3, 32, 32) and len(manifest.classes) == 10
    _, labels = read_split(str(tmp_path / "a"), "train")
    assert torch.bincount(labels).tolist() == [6] * 10  # class-balanced


def test_shapes_defeat_a_template_matcher_that_solves_digits():
    def nearest_class_mean(parts_train, parts_test) -> float:
        (x, y), (xt, yt) = (
            [np.concatenate(v) for v in zip(*(p.load() for p in ps))] for ps in (parts_train, parts_test)
        )
        x, xt = x.reshape(len(x), -1) / 255, xt.reshape(len(xt), -1) / 255
        means = np.stack([x[y == k].mean(axis=0) for k in range(y.max() + 1)])
        return float((((xt[:, None] - means) ** 2).sum(-1).argmin(axis=1) == yt).mean())

    digits = plan("digits").splits
    shapes = shapes_plan(ShapesConfig(train=1000, test=500), shard_size=1000).splits
    assert nearest_class_mean(digits["train"], digits["test"]) > 0.85
    assert nearest_class_mean(shapes["train"], shapes["test"]) < 0.2  # chance is 0.1


def _interrupt(*_):
    raise KeyboardInterrupt


def test_a_rerun_keeps_finished_shards_and_an_interrupted_one_is_never_accepted(tmp_path, caplog):
    clean, dest = tmp_path / "clean", tmp_path / "dest"
    full = shapes_plan(SMALL_SHAPES, shard_size=16)  # 4 train + 2 test shards
    write_dataset(full, str(clean))
    # Interrupted while converting the third train shard, after a killed upload left debris.
    parts = full.splits["train"]
    broken = replace(parts[2], load=_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(
            replace(full, splits={"train": parts[:2] + [broken] + parts[3:], "test": full.splits["test"]}), str(dest)
        )
    (dest / "train/part-00003.parquet").write_bytes(files(clean)["train/part-00003.parquet"][:500])
    (dest / "train/.part-00002.parquet.tmp").write_bytes(files(clean)["train/part-00002.parquet"][:500])
    assert len(files(dest)) == 4
    with pytest.raises(DataError, match="manifest.json: missing"):
        open_dataset(str(dest))
    finished = {p: (dest / p).stat().st_mtime_ns for p in ("train/part-00000.parquet", "train/part-00001.parquet")}
    with caplog.at_level(logging.INFO):
        write_dataset(full, str(dest))
        assert "wrote 4 shards, kept 2" in caplog.text
        write_dataset(full, str(dest))
        assert "wrote 0 shards, kept 6" in caplog.text
    assert {p: (dest / p).stat().st_mtime_ns for p in finished} == finished
    assert files(dest) == files(clean)


def test_a_changed_plan_rewrites_the_shards_it_changes(tmp_path):
    write_dataset(shapes_plan(SMALL_SHAPES, shard_size=16), str(tmp_path / "d"))
    more = replace(SMALL_SHAPES, test=30)
    write_dataset(shapes_plan(more, shard_size=16), str(tmp_path / "d"))
    write_dataset(shapes_plan(more, shard_size=16), str(tmp_path / "clean"))
    assert files(tmp_path / "d") == files(tmp_path / "clean")


def test_several_writer_processes_write_the_same_bytes(tmp_path):
    write_dataset(shapes_plan(SMALL_SHAPES, shard_size=16), str(tmp_path / "one"))
    write_dataset(shapes_plan(SMALL_SHAPES, shard_size=16), str(tmp_path / "two"), workers=2)
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_a_shard_whose_labels_disagree_with_the_plan_is_not_written(tmp_path):
    plan_ = shapes_plan(SMALL_SHAPES, shard_size=16)
    images = np.zeros((16, 3, 32, 32), np.uint8)
    bad = Part("bad", 16, lambda: (images, np.full(16, 10)))
    with pytest.raises(
        DataError, match=r"train/part-00000.parquet \(from bad\): labels must be 16 values in \[0, 10\)"
    ):
        write_dataset(replace(plan_, splits={"train": [bad]}), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --- the command line --------------------------------------------------------------------


def test_cli_converts_digits_and_shapes(tmp_path, capsys):
    assert main(["data", "convert", "digits", str(tmp_path / "digits")]) == 0
    assert (
        main(
            [
                "data",
                "convert",
                "shapes",
                str(tmp_path / "shapes"),
                "--train",
                "40",
                "--test",
                "10",
                "--num-classes",
                "4",
                "--shard-size",
                "16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "digits, 10 classes, train 1500, test 297" in out and "shapes, 4 classes, train 40, test 10" in out
    assert len(open_dataset(str(tmp_path / "shapes")).manifest.shards("train")) == 3


def test_cli_reports_bad_input_in_one_line(tmp_path, caplog):
    assert main(["data", "convert", "cifar10", str(tmp_path / "nowhere.tar.gz"), str(tmp_path / "out")]) == 1
    assert "nowhere.tar.gz: missing" in caplog.text
    assert not (tmp_path / "out").exists()


def test_cli_help_lists_every_converter(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["data", "convert", "--help"])
    assert exit.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in ("digits", "shapes", "cifar10", "cifar100", "tinyimagenet", "imagenet"))
