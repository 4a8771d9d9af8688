"""The datasets `lipscale data convert` knows, and their defaults: plain data, so the
command line (lipscale.cli) lists and declares them without importing the
converters (torch, scikit-learn, PIL; lipscale.data.convert)."""

CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        names=b"label_names",
        labels=b"labels",
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        meta="meta",
        names=b"fine_label_names",
        labels=b"fine_labels",
    ),
}
"""The official python tarballs: the folder inside, the batch files of each split, the
metadata file, and the keys of the class names and labels in them."""

SHARD_SIZE = 10_000
"""Samples per shard unless a converter (CLASS_FOLDERS) or the command line says otherwise."""
CLASS_FOLDERS = {  # name: (image side, encoding, shard size) defaults
    "tinyimagenet": (64, "raw", SHARD_SIZE),
    "imagenet": (224, "png", 1_000),  # ~100 MB shards of PNGs
}
GENERATED = ("digits", "shapes")
"""Converters that need no source (scikit-learn's bundled digits, the seeded shapes generator): a
study converts these itself, under its root, on first use."""
CONVERTERS = (*GENERATED, *CIFAR, *CLASS_FOLDERS)
"""Every converter's name."""


def convert_command(name: str, dest: str) -> str:
    """The command that writes dataset `name` to `dest`."""
    if name in GENERATED:
        return f"lipscale data convert {name} {dest}"
    return f"lipscale data convert {name if name in CONVERTERS else 'NAME'} SOURCE {dest}"
