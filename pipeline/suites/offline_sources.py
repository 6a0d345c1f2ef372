"""Colour and texture tasks of the embedded suite, cut or rendered from files inside wheels.

Four generated tasks, each a deterministic function of a seed (no download, no network):

- ``photos`` (SUN397-like, colour): crops of ten colour photographs that ship with
  scikit-image (astronaut, chelsea the cat, coffee, rocket, Hubble deep field, an
  immunohistochemistry slide, the stereo motorcycle, a retina) and scikit-learn
  (``china.jpg``, ``flower.jpg``); the class is the photograph.
- ``textures`` (DTD-like, greyscale): crops of eight greyscale images of scikit-image
  (brick, grass, gravel, moon craters, coins, a printed page, painted text, cells).
- ``svhn`` (SVHN-like, colour): a digit rendered from one of matplotlib's 22 bundled font
  files (DejaVu, STIX, Computer Modern), in a random colour, on a crop of a colour photograph,
  with parts of neighbouring digits at both sides; the class is the centre digit.
- ``signs`` (GTSRB-like, colour): ten road-sign kinds drawn with PIL (shape, colours,
  glyph from a bundled font) on photo crops, randomly scaled, shifted, rotated and dimmed.

Crops: for a source image of h x w, a square of side ``U(0.12, 0.35) * min(h, w)`` at a
random position, resized (bicubic, PIL) to 32 x 32. The *pretraining pool* of the suite must
be disjoint from every evaluated image: crops for pretraining come from the left 30% of each
image's columns, crops for the task's train/val/test splits from the right 70% (so no
evaluated crop shares a pixel with a pretraining crop). Rendered tasks draw pretraining and
task images from separate random streams.

Every loader returns ``(images uint8 (N, S, S[, 3]), labels int64 (N,), pretrain bool (N,))``;
``pretrain`` marks the rows reserved for the pretraining pool.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

SIZE = 32
PRETRAIN_COLUMNS = 0.3  # left share of each source image's columns used for pretraining crops


# ------------------------------------------------------------------------- source images
def _photo(name: str) -> np.ndarray:
    if name in ("china", "flower"):  # sklearn's sample images, read without importing sklearn
        import importlib.util

        from PIL import Image

        spec = importlib.util.find_spec("sklearn")
        folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images"
        with Image.open(folder / f"{name}.jpg") as im:
            return np.asarray(im.convert("RGB"))
    from skimage import data

    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    return getattr(data, name)()


PHOTOS = {  # class name -> source
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "galaxy": "hubble_deep_field",
    "tissue": "immunohistochemistry",
    "motorcycle": "motorcycle",
    "retina": "retina",
    "temple": "china",
    "flower": "flower",
}
TEXTURES = {
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "craters": "moon",
    "coins": "coins",
    "print": "page",
    "lettering": "text",
    "cells": "cell",
}


@functools.cache
def photo_images() -> tuple[np.ndarray, ...]:
    return tuple(_photo(src) for src in PHOTOS.values())


@functools.cache
def texture_images() -> tuple[np.ndarray, ...]:
    from skimage import data

    return tuple(getattr(data, src)() for src in TEXTURES.values())


def _resize(patch: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(patch).resize((size, size), Image.BICUBIC))


def random_crop(
    image: np.ndarray, rng: np.random.Generator, pretrain: bool, size: int = SIZE
) -> np.ndarray:
    """One square crop (see module docstring): pretraining crops from the left columns."""
    h, w = image.shape[:2]
    side = max(8, int(rng.uniform(0.12, 0.35) * min(h, w)))
    cut = int(PRETRAIN_COLUMNS * w)
    lo, hi = (0, cut) if pretrain else (cut, w)
    side = min(side, hi - lo, h)
    x = int(rng.integers(lo, hi - side + 1))
    y = int(rng.integers(0, h - side + 1))
    return _resize(np.ascontiguousarray(image[y : y + side, x : x + side]), size)


def _crop_task(
    images: tuple[np.ndarray, ...], per_class: int, pretrain_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xs, ys, ps = [], [], []
    for c, img in enumerate(images):
        for pre, n in ((True, pretrain_per_class), (False, per_class)):
            xs += [random_crop(img, rng, pre) for _ in range(n)]
            ys += [c] * n
            ps += [pre] * n
    return np.stack(xs), np.asarray(ys, dtype=np.int64), np.asarray(ps, dtype=bool)


# Default sizes per class (task images, pretraining images); ``per_class`` overrides the first
# and scales the second by the same factor (tiny settings).
def _sizes(default: int, pretrain: int, per_class: int | None) -> tuple[int, int]:
    if per_class is None:
        return default, pretrain
    return int(per_class), max(1, round(per_class * pretrain / default))


def load_photos(seed: int = 0, per_class: int | None = None):
    return _crop_task(photo_images(), *_sizes(300, 150, per_class), seed)


def load_textures(seed: int = 0, per_class: int | None = None):
    return _crop_task(texture_images(), *_sizes(300, 150, per_class), seed)


# ------------------------------------------------------------------------- rendering
@functools.cache
def font_files() -> tuple[Path, ...]:
    """matplotlib's bundled text fonts (symbol-only STIX size fonts and LastResort excluded)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    keep = ("DejaVu", "STIXGeneral", "cmr10", "cmss10", "cmtt10", "cmb10", "cmti10")
    files = sorted(p for p in folder.glob("*.ttf") if p.name.startswith(keep))
    if len(files) < 10:
        raise FileNotFoundError(
            f"expected matplotlib's bundled fonts in {folder}; found {[p.name for p in files]}"
        )
    return tuple(files)


@functools.lru_cache(maxsize=512)
def _font(path: Path, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(path), size)


@functools.cache
def background_images() -> tuple[np.ndarray, ...]:
    """The colour photographs shrunk to at most 320 px a side (backgrounds need no detail)."""
    from PIL import Image

    out = []
    for img in photo_images():
        im = Image.fromarray(img)
        im.thumbnail((320, 320), Image.BICUBIC)
        out.append(np.asarray(im))
    return tuple(out)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    photos = background_images()
    return random_crop(photos[int(rng.integers(len(photos)))], rng, bool(rng.random() < 0.5), size)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, ...]:
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(20):
        c = rng.integers(0, 256, 3)
        if np.abs(c - mean).sum() > 180:
            return tuple(int(v) for v in c)
    return tuple(int(v) for v in np.where(mean > 127, 0, 255))


def render_digit(digit: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """An SVHN-like image: centre digit plus cut-off neighbours on a photo crop."""
    from PIL import Image, ImageDraw

    canvas = 3 * size
    bg = _background(rng, canvas)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    fonts = font_files()
    font = _font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(56, 84)))
    colour = _contrasting_colour(rng, bg)
    text = f"{rng.integers(10)}{digit}{rng.integers(10)}"
    _, top, _, bottom = draw.textbbox((0, 0), text, font=font)
    mid_right = draw.textbbox((0, 0), text[:2], font=font)[2]
    first_right = draw.textbbox((0, 0), text[:1], font=font)[2]
    centre_x = (first_right + mid_right) / 2  # centre of the middle digit
    x0 = canvas / 2 - centre_x + rng.uniform(-3, 3)
    y0 = canvas / 2 - (top + bottom) / 2 + rng.uniform(-3, 3)
    draw.text((x0, y0), text, font=font, fill=colour)
    return _resize(np.asarray(img), size)


def _polygon(n: int, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
        for k in range(n)
    ]


RED, WHITE, BLUE, YELLOW, BLACK = (
    (200, 20, 30),
    (245, 245, 245),
    (20, 60, 180),
    (250, 200, 0),
    (
        10,
        10,
        10,
    ),
)
# class name -> (shape, fill, border, glyph, glyph colour)
SIGNS = {
    "stop": ("octagon", RED, WHITE, "STOP", WHITE),
    "yield": ("down_triangle", WHITE, RED, "", BLACK),
    "warning": ("triangle", WHITE, RED, "!", BLACK),
    "no entry": ("circle", RED, RED, "—", WHITE),
    "speed limit thirty": ("circle", WHITE, RED, "30", BLACK),
    "speed limit fifty": ("circle", WHITE, RED, "50", BLACK),
    "speed limit eighty": ("circle", WHITE, RED, "80", BLACK),
    "parking": ("square", BLUE, WHITE, "P", WHITE),
    "keep right": ("circle", BLUE, WHITE, "→", WHITE),
    "priority road": ("diamond", YELLOW, WHITE, "", BLACK),
}


def render_sign(kind: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A GTSRB-like image: one road sign on a photo crop, scaled, shifted, rotated, dimmed."""
    from PIL import Image, ImageDraw, ImageEnhance

    shape, fill, border, glyph, glyph_colour = list(SIGNS.values())[kind]
    canvas = 96
    sign = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    d = ImageDraw.Draw(sign)
    c, r = canvas / 2, canvas * 0.46
    width = max(3, int(canvas * 0.08))
    if shape == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=border)
        d.ellipse([c - r + width, c - r + width, c + r - width, c + r - width], fill=fill)
    else:
        n, rot = {
            "octagon": (8, math.pi / 8),
            "triangle": (3, -math.pi / 2),
            "down_triangle": (3, math.pi / 2),
            "square": (4, math.pi / 4),
            "diamond": (4, 0.0),
        }[shape]
        rr = r * (1.0 if n != 4 or shape == "diamond" else 1.2)
        d.polygon(_polygon(n, c, c, rr, rot), fill=border)
        inner = rr - width * (2.0 if n == 3 else 1.2)
        d.polygon(_polygon(n, c, c, inner, rot), fill=fill)
    if glyph:
        fonts = font_files()
        fsize = {4: 26, 2: 34, 1: 46}.get(len(glyph), 40)
        font = _font(fonts[int(rng.integers(len(fonts)))], fsize)
        left, top, right, bottom = d.textbbox((0, 0), glyph, font=font)
        dy = 8 if shape == "triangle" else 0
        d.text(
            (c - (left + right) / 2, c - (top + bottom) / 2 + dy),
            glyph,
            font=font,
            fill=glyph_colour,
        )
    sign = sign.rotate(float(rng.uniform(-12, 12)), resample=Image.BICUBIC)
    scale = rng.uniform(0.55, 0.95)
    side = max(8, int(canvas * scale))
    sign = sign.resize((side, side), Image.BICUBIC)
    bg = Image.fromarray(_background(rng, canvas))
    ox = int(rng.integers(0, canvas - side + 1))
    oy = int(rng.integers(0, canvas - side + 1))
    bg.paste(sign, (ox, oy), sign)
    bg = ImageEnhance.Brightness(bg).enhance(float(rng.uniform(0.5, 1.2)))
    return _resize(np.asarray(bg.convert("RGB")), size)


def _render_task(render, n_classes: int, per_class: int, pretrain_per_class: int, seed: int):
    xs, ys, ps = [], [], []
    for pre, n, stream in ((False, per_class, 0), (True, pretrain_per_class, 1)):
        rng = np.random.default_rng([seed, stream])
        for c in range(n_classes):
            xs += [render(c, rng) for _ in range(n)]
            ys += [c] * n
            ps += [pre] * n
    return np.stack(xs), np.asarray(ys, dtype=np.int64), np.asarray(ps, dtype=bool)


def load_svhn(seed: int = 0, per_class: int | None = None):
    return _render_task(render_digit, 10, *_sizes(400, 150, per_class), seed)


def load_signs(seed: int = 0, per_class: int | None = None):
    return _render_task(render_sign, len(SIGNS), *_sizes(300, 150, per_class), seed)
