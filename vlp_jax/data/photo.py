"""Preprocessing of real photographs read from files (numpy + PIL, one image at a time).

The shapes world stores square images of the training size; photos come in any size, mode and
format (JPEG, PNG, WebP, ... whatever PIL reads). `PhotoTransform` turns one into float32
[S, S, 3] with CLIP's recipes (the transforms open_clip's `image_transform` builds):

  * decode (`clean`): any PIL mode -> RGB uint8 [H, W, 3] (greyscale replicated, alpha
    composited over black, as `vlp_jax.data.sanitize`); undecodable, truncated or empty bytes
    raise `sanitize.BadExample` (kind skipped_undecodable).
  * evaluation (`eval`): the shorter side resized to S (bicubic), then the centred S x S crop.
  * training (`train`): a random-resized crop (Szegedy et al. 2015, as torchvision's
    RandomResizedCrop): a window of area fraction a ~ U(scale) of the image and aspect ratio r
    with log r ~ U(log 3/4, log 4/3), width sqrt(a H W r), height sqrt(a H W / r), placed
    uniformly; up to 10 draws, then the centred crop of the clamped ratio; resized to S x S
    (bicubic). Default scale (0.9, 1.0), open_clip's training default. A horizontal flip with
    probability 1/2 only when `hflip` (off by default: captions name left and right).
  * normalisation: (x / 255 - mean) / std per channel; the default mean = std = 0.5 gives the
    shapes pipeline's [-1, 1] mapping.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from vlp_jax.data import sanitize

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_ATTEMPTS = 10


def decode_rgb(raw: bytes) -> tuple[np.ndarray, bool]:
    """Encoded image bytes -> (uint8 [H, W, 3], whether the stored mode was not RGB); raises
    BadExample (skipped_undecodable) for anything PIL cannot read completely."""
    if not len(raw):
        raise sanitize.BadExample("undecodable image: empty file", "skipped_undecodable")
    image, converted = sanitize._decode(raw)
    image = sanitize._channels_to_rgb(image)
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise sanitize.BadExample(f"undecodable image: zero-sized {image.shape}",
                                  "skipped_undecodable")
    return image, converted


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], bicubic (PIL)."""
    from PIL import Image
    if image.shape[:2] == (height, width):
        return image
    out = Image.fromarray(np.ascontiguousarray(image)).resize(
        (width, height), Image.Resampling.BICUBIC)
    return np.asarray(out, np.uint8)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: shorter side resized to `size` (bicubic), the
    centred square cropped (CLIP's evaluation transform)."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    image = _resize(image, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def random_crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.9, 1.0),
                    ratio=_RATIO) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized-crop window (see the module docstring)."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_ATTEMPTS):
        target = area * float(rng.uniform(scale[0], scale[1]))
        r = math.exp(float(rng.uniform(log_lo, log_hi)))
        cw, ch = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    in_ratio = w / h                       # fallback: the centred crop of the clamped ratio
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclasses.dataclass(frozen=True)
class PhotoTransform:
    """Photo bytes -> model images float32 [size, size, 3] (see the module docstring)."""
    size: int
    augment: bool = True
    scale: tuple[float, float] = (0.9, 1.0)
    hflip: bool = False
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"image size must be >= 1, got {self.size}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"image mean / std need 3 values (std > 0), got {self.mean}, "
                             f"{self.std}")

    def clean(self, raw) -> tuple[np.ndarray, frozenset[str]]:
        """Encoded bytes (or a uint8 array) -> (uint8 [H, W, 3] at its own size, flags
        ⊆ {"converted"}); BadExample when unreadable."""
        if (isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.size
                and (raw.ndim == 2 or (raw.ndim == 3 and raw.shape[2] in (1, 2, 3, 4)))):
            converted = raw.ndim == 2 or raw.shape[2] != 3
            return sanitize._channels_to_rgb(raw), frozenset({"converted"} if converted else ())
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise sanitize.BadExample(f"undecodable image: got a {type(raw).__name__}",
                                      "skipped_undecodable")
        image, converted = decode_rgb(bytes(raw))
        return image, frozenset({"converted"} if converted else ())

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 [..., 3] -> float32 (x / 255 - mean) / std."""
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return (np.asarray(image, np.float32) / 255.0 - mean) / std

    def eval(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [size, size, 3]: resize, centre crop, normalise."""
        return self.normalize(resize_center_crop(image, self.size))

    def train(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [size, size, 3]: random-resized crop (and flip when
        `hflip`), normalised; without `augment`, the evaluation transform."""
        if not self.augment:
            return self.eval(image)
        top, left, h, w = random_crop_box(image.shape[0], image.shape[1], rng, self.scale)
        out = _resize(image[top:top + h, left:left + w], self.size, self.size)
        if self.hflip and rng.random() < 0.5:
            out = out[:, ::-1]
        return self.normalize(out)


def photo_transform(data_config) -> PhotoTransform:
    """The PhotoTransform of a file-source data section (data.image_size, augment,
    crop_scale_min / max, hflip, image_mean, image_std)."""
    return PhotoTransform(
        size=int(data_config.image_size), augment=bool(data_config.augment),
        scale=(float(data_config.crop_scale_min), float(data_config.crop_scale_max)),
        hflip=bool(data_config.hflip), mean=tuple(float(v) for v in data_config.image_mean),
        std=tuple(float(v) for v in data_config.image_std))
