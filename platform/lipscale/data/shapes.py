"""`shapes`: a procedurally generated, seeded 32x32 RGB classification set.

A class is a shape (disk, ring, square, triangle, cross) with a fill (solid,
striped, checkered); the default 10 classes are the five shapes, solid and
striped. Every image draws its position, size, rotation, colours, fill
period, background texture, clutter strokes (some in front of the shape) and
pixel noise. Digits saturates within seconds; this set keeps width ladders
apart on a laptop: 500 steps of 64 on 5000 samples (crop+flip, depth 4) give
width 64 27% clean / 7% CRA at 36/255, width 256 42% / 12.5%.

Each shard is drawn from its own stream (seed, split, shard), so any size
can be generated shard by shard, in parallel, and the same seed gives
identical bytes.
"""

from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

from lipscale.data.catalog import SHARD_SIZE
from lipscale.data.parts import Part, Plan

SHAPES = ("disk", "ring", "square", "triangle", "cross")
FILLS = ("solid", "striped", "checkered")
SIZE = 32
_SPLITS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class ShapesConfig:
    train: int = 50_000
    """Samples in the train split."""
    test: int = 10_000
    """Samples in the test split."""
    num_classes: int = 10
    """Classes: the first num_classes of (fill, shape) in fill-major order, at most 15."""
    seed: int = 0
    """Same seed, same bytes."""
    noise: float = 0.05
    """Std of the Gaussian pixel noise, pixels in [0, 1]."""
    clutter: int = 4
    """Most clutter strokes per image (uniform from 0)."""
    texture: float = 0.08
    """Amplitude of the faint background stripes that half the images get."""
    min_radius: float = 6.0
    """Smallest shape radius in pixels."""
    max_radius: float = 12.0
    """Largest shape radius in pixels."""

    def __post_init__(self):
        if not 2 <= self.num_classes <= len(SHAPES) * len(FILLS):
            raise ValueError(f"num_classes must lie in [2, {len(SHAPES) * len(FILLS)}], got {self.num_classes}")
        if min(self.train, self.test) < 1:
            raise ValueError("train and test need at least one sample each")
        if not 0 < self.min_radius <= self.max_radius <= SIZE / 2:
            raise ValueError(f"need 0 < min_radius <= max_radius <= {SIZE // 2}")

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(f"{fill}-{shape}" for fill in FILLS for shape in SHAPES)[: self.num_classes]


def shapes_plan(config: ShapesConfig, shard_size: int = SHARD_SIZE) -> Plan:
    splits = {}
    for split, total in (("train", config.train), ("test", config.test)):
        counts = [min(shard_size, total - start) for start in range(0, total, shard_size)]
        splits[split] = [
            Part(
                f"shapes {asdict(config)} {split} {i} {n}",
                n,
                partial(render_shard, config, split, i, i * shard_size, n),
            )
            for i, n in enumerate(counts)
        ]
    return Plan("shapes", (3, SIZE, SIZE), config.classes, "raw", splits)


def render_shard(config: ShapesConfig, split: str, index: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Shard `index` of `split`, samples first..first+count-1: uint8 images
    (count, 3, 32, 32) and labels; sample i has class i % num_classes, so the
    split is balanced."""
    rng = np.random.default_rng([config.seed, _SPLITS[split], index])
    labels = rng.permutation((first + np.arange(count)) % config.num_classes)
    return render(labels, rng, config), labels


def render(labels: np.ndarray, rng: np.random.Generator, config: ShapesConfig) -> np.ndarray:
    n = len(labels)
    y, x = (np.mgrid[0:SIZE, 0:SIZE] + 0.5).astype(np.float32)  # pixel centres
    x, y = x[None], y[None]

    def draw(low, high, *shape):
        return rng.uniform(low, high, (n, *shape)).astype(np.float32)

    def column(v):  # per-sample values broadcast over the image
        return v.reshape(n, *([1] * 2))

    # Background: a muted colour, a gradient, and faint stripes in half the images. A
    # 1-Lipschitz net keeps all of its input's energy, so saturated random backgrounds
    # drown the shape (10-class accuracy 17% instead of 29% after 300 steps at width 64).
    bg = draw(0.3, 0.7, 3)
    angle, period, phase = draw(0, 2 * np.pi), draw(3, 8), draw(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * (x * column(np.cos(angle)) + y * column(np.sin(angle))) / column(period) + column(phase))
    texture = config.texture * wave * column(rng.random(n) < 0.5) + column(draw(-0.15, 0.15)) * (x - SIZE / 2) / SIZE
    image = np.clip(bg[:, :, None, None] + texture[:, None], 0, 1)

    # Clutter strokes, a third of them drawn over the shape; each drawn only where it exists.
    strokes = []
    count = rng.integers(0, config.clutter + 1, n)
    for k in range(config.clutter):
        a, b, width, colour, front = (
            draw(0, SIZE, 2),
            draw(0, SIZE, 2),
            draw(0.6, 1.4),
            draw(0, 1, 3),
            rng.random(n) < 1 / 3,
        )
        for layer in (~front, front):
            index = np.nonzero(layer & (k < count))[0]
            strokes.append((index, _segment_coverage(x, y, a[index], b[index], width[index]), colour[index]))
    for index, cover, colour in strokes[0::2]:
        _paint(image, index, cover, colour)

    # The shape: signed distance in its own rotated frame, antialiased over one pixel.
    cx, cy = draw(SIZE / 2 - 7, SIZE / 2 + 7), draw(SIZE / 2 - 7, SIZE / 2 + 7)
    radius, theta = draw(config.min_radius, config.max_radius), draw(0, 2 * np.pi)
    dx, dy = x - column(cx), y - column(cy)
    u = dx * column(np.cos(theta)) + dy * column(np.sin(theta))
    v = -dx * column(np.sin(theta)) + dy * column(np.cos(theta))
    r = column(radius)
    distance = np.empty_like(u)
    for k, shape in enumerate(SHAPES):
        index = labels % len(SHAPES) == k
        distance[index] = _shape_distance(shape, u[index], v[index], r[index])
    cover = np.clip(0.5 - distance, 0, 1)

    # Fill: solid, or stripes / checks of a second colour at a random period and angle.
    fg = draw(0, 1, 3)
    close = np.linalg.norm(fg - bg, axis=1) < 0.4
    fg[close] = (bg[close] + 0.5) % 1  # keep the shape visible against its background
    fg2 = (fg + 0.5) % 1
    period, turn = column(draw(2.5, 5)), column(draw(0, 2 * np.pi))
    s = (u * np.cos(turn) + v * np.sin(turn)) / period
    t = (-u * np.sin(turn) + v * np.cos(turn)) / period
    stripes = np.sin(2 * np.pi * s) > 0
    checks = (np.sin(2 * np.pi * s) * np.sin(2 * np.pi * t)) > 0
    pattern = np.choose(column(labels // len(SHAPES)), [np.ones_like(stripes), stripes, checks])[:, None]
    fill = np.where(pattern, fg[:, :, None, None], fg2[:, :, None, None])
    image += cover[:, None] * (fill - image)

    for index, cover, colour in strokes[1::2]:
        _paint(image, index, cover, colour)
    image = image + rng.normal(0, config.noise, image.shape).astype(np.float32)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) in the shape's own frame; circumradius ~r."""
    if shape == "disk":
        return np.hypot(u, v) - r
    if shape == "ring":
        return np.abs(np.hypot(u, v) - 0.7 * r) - 0.3 * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.75 * r
    if shape == "triangle":  # equilateral, inradius r / 2: the farthest of its three edge lines
        return np.maximum(np.maximum(v, -0.866 * u - 0.5 * v), 0.866 * u - 0.5 * v) - 0.5 * r
    au, av = np.abs(u), np.abs(v)  # cross: two bars of half-width 0.3 r
    return np.minimum(np.maximum(au - r, av - 0.3 * r), np.maximum(av - r, au - 0.3 * r))


def _segment_coverage(x, y, a, b, width) -> np.ndarray:
    """Antialiased coverage of segments a -> b (n, 2) of the given widths (n,)."""
    ax, ay, bx, by = (c[:, None, None] for c in (a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
    ex, ey = bx - ax, by - ay
    t = np.clip(((x - ax) * ex + (y - ay) * ey) / np.maximum(ex * ex + ey * ey, 1e-6), 0, 1)
    distance = np.hypot(x - ax - t * ex, y - ay - t * ey)
    return np.clip(width[:, None, None] / 2 + 0.5 - distance, 0, 1)


def _paint(image: np.ndarray, index: np.ndarray, cover: np.ndarray, colour: np.ndarray):
    """Blends `colour` over images[index] with per-pixel `cover`, in place."""
    image[index] += cover[:, None] * (colour[:, :, None, None] - image[index])
