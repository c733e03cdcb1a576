"""Image preprocessing and meaning-preserving augmentation (numpy, one example at a time).

Captions name colours, sizes and left/right/above/below, so augmentation must keep them true:
no flips, no rotations, no hue changes. What it does (`augment_image`):
  * crop-and-resize: a square window of side `scale` x the image side (default scale in
    [0.92, 1.12]: at most 9% zoom in, 12% zoom out, so small objects stay smaller than large
    ones) about a centre shifted by up to `max_shift` of the side (default 4%; scenes keep a 5%
    border free, so objects stay in view), resized back bilinearly; samples outside the image
    repeat its edge (background);
  * brightness / contrast jitter applied equally to all channels (hue kept).
Output images are float32 in [-1, 1] (`normalize`).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    min_scale: float = 0.92          # window side / image side is drawn in [min, max]
    max_scale: float = 1.12
    max_shift: float = 0.04          # centre shift as a fraction of the side, each axis
    brightness: float = 0.08         # additive, in [-1, 1] units: +- this
    contrast: float = 0.15           # multiplicative about the mean: 1 +- this

    def __post_init__(self):
        if not 0.5 <= self.min_scale <= self.max_scale <= 2.0:
            raise ValueError("need 0.5 <= min_scale <= max_scale <= 2, got "
                             f"{self.min_scale}, {self.max_scale}")
        for name in ("max_shift", "brightness", "contrast"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {getattr(self, name)}")


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 in [-1, 1]."""
    return np.asarray(image, np.float32) * (2.0 / 255.0) - 1.0


def resample_matrix(size: int, scale: float, shift: float) -> np.ndarray:
    """float32 [size, size] bilinear weights: out[i] = sum_j W[i, j] in[j] samples the input at
    centre + (i + 0.5 - size / 2) * scale - 0.5 (pixels), centre = size / 2 + shift * size,
    clamped to the image (rows of W sum to 1)."""
    pos = size / 2 + shift * size + (np.arange(size, dtype=np.float32) + 0.5 - size / 2) * scale
    pos = np.minimum(np.maximum(pos - 0.5, 0), size - 1)
    return np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(size, dtype=np.float32)))


def crop_and_resize(image: np.ndarray, scale: float, shift_y: float, shift_x: float
                    ) -> np.ndarray:
    """float32 [H, W, C] -> float32 [H, W, C]: the window of side scale * H about the shifted
    centre, resized back to H x W (square images)."""
    h, w, c = image.shape
    wy, wx = resample_matrix(h, scale, shift_y), resample_matrix(w, scale, shift_x)
    rows = (wy @ image.reshape(h, w * c)).reshape(h, w, c)                      # along y
    cols = wx @ rows.transpose(1, 0, 2).reshape(w, h * c)                       # along x
    return cols.reshape(w, h, c).transpose(1, 0, 2)


@dataclasses.dataclass(frozen=True)
class AugmentDraw:
    """One example's augmentation parameters (`draw_augment`): the crop window's side `scale`
    (a fraction of the image side) and its centre shift (shift_y, shift_x, fractions of the
    side), then the photometric contrast and brightness."""
    scale: float = 1.0
    shift_y: float = 0.0
    shift_x: float = 0.0
    contrast: float = 1.0
    brightness: float = 0.0

    def map_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes [..., 4] (x0, y0, x1, y1 in [0, 1] of the input image) -> the same boxes in the
        augmented view's coordinates, clipped to [0, 1]. The view's point u samples the input
        at 0.5 + shift + (u - 0.5) * scale (`resample_matrix` in continuous coordinates), so
        u = (x - 0.5 - shift) / scale + 0.5."""
        b = np.asarray(boxes, np.float32)
        shift = np.array([self.shift_x, self.shift_y, self.shift_x, self.shift_y], np.float32)
        return np.clip((b - 0.5 - shift) / self.scale + 0.5, 0.0, 1.0).astype(np.float32)


def draw_augment(rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> AugmentDraw:
    """The parameters `augment_image` applies, drawn from `rng` (scale, shifts, contrast,
    brightness, in that order)."""
    scale = float(rng.uniform(cfg.min_scale, cfg.max_scale))
    sy, sx = rng.uniform(-cfg.max_shift, cfg.max_shift, 2)
    contrast = float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast))
    brightness = float(rng.uniform(-cfg.brightness, cfg.brightness))
    return AugmentDraw(scale, float(sy), float(sx), contrast, brightness)


def apply_augment(image: np.ndarray, draw: AugmentDraw) -> np.ndarray:
    """uint8 or float32 [H, W, 3] -> float32 [H, W, 3] in [-1, 1]: `draw`'s crop-and-resize,
    then its contrast about the mean and its brightness."""
    x = normalize(image) if image.dtype == np.uint8 else np.asarray(image, np.float32)
    x = crop_and_resize(x, draw.scale, draw.shift_y, draw.shift_x)
    mean = float(x.mean())
    x = (x - mean) * draw.contrast + mean + draw.brightness
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def augment_image(image: np.ndarray, rng: np.random.Generator,
                  cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """uint8 or float32 [H, W, 3] -> float32 [H, W, 3] in [-1, 1], randomly cropped, resized
    and photometrically jittered (see the module docstring)."""
    return apply_augment(image, draw_augment(rng, cfg))


def augment_config(data_config) -> AugmentConfig:
    """AugmentConfig from optional data.augment_* fields (defaults otherwise)."""
    fields = {f.name: data_config.get(f"augment_{f.name}", f.default)
              for f in dataclasses.fields(AugmentConfig)}
    return AugmentConfig(**fields)
