"""`vlp-jax caption`: captions for image files from a trained generative model's checkpoint.

Each file is decoded (PNG / JPEG / WebP, any mode -> RGB), resized so its shorter side is the
model's `data.image_size` and centre-cropped (CLIP's evaluation transform), normalised as the
training images are, and captioned with the method's `generate` predict function
(`method.decoding`: greedy, beam or sampling). An unreadable file is an error naming it.
"""
from __future__ import annotations

import os
from typing import Sequence

import ml_collections
import numpy as np

from vlp_jax.data.preprocess import normalize


def load_image(path: str, size: int) -> np.ndarray:
    """An image file -> float32 [size, size, 3] in [-1, 1] (shorter side resized to `size`
    with bicubic filtering, then a centre crop)."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                           Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return normalize(np.asarray(im, np.uint8))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image file {path!r}: {e}") from None


def caption_files(config: ml_collections.ConfigDict, workdir: str, paths: Sequence[str],
                  step: int | None = None) -> list[str]:
    """One caption per image file, from the latest (or given) checkpoint in workdir."""
    from vlp_jax.train.trainer import restore_experiment
    if not paths:
        raise ValueError("no image files given (--images FILE ...)")
    images = np.stack([load_image(p, config.data.image_size) for p in paths])
    exp, state = restore_experiment(config, workdir, step)
    predict = exp.predict_fns(state.params)
    if "generate" not in predict:
        raise ValueError(f"method {config.method.name!r} does not generate text (no 'generate' "
                         "predict function): caption needs a generative model (git_shapes.py, "
                         "simvlm_shapes.py, coca_shapes.py)")
    # one batch, padded to a multiple of the mesh's devices so it divides evenly
    n, devices = len(images), exp.mesh.devices.size
    padded = -(-n // devices) * devices
    batch = np.concatenate([images, np.repeat(images[-1:], padded - n, axis=0)])
    tokens = np.asarray(predict["generate"](batch))[:n]
    return exp.data.detokenize(tokens)
