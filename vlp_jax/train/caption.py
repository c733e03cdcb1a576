"""`vlp-jax caption`: captions for image files from a trained generative model's checkpoint.

Each file is decoded (PNG / JPEG / WebP, any mode -> RGB), resized so its shorter side is the
model's `data.image_size` and centre-cropped (CLIP's evaluation transform, `data.photo`),
normalised as the training images are, and captioned with the method's `generate` predict function
(`method.decoding`: greedy, beam or sampling). An unreadable file is an error naming it.
"""
from __future__ import annotations

import os
from typing import Sequence

import ml_collections
import numpy as np

from vlp_jax.data import photo
from vlp_jax.data.preprocess import normalize
from vlp_jax.data.sanitize import BadExample


def load_image(path: str, data_config) -> np.ndarray:
    """An image file -> float32 [S, S, 3] as the model's evaluation images are made: decoded
    to RGB, shorter side resized to data.image_size, centre crop (`data.photo`), normalised
    with the data section's mean / std (file sources) or to [-1, 1] (shapes)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        image, _ = photo.decode_rgb(raw)
    except BadExample as e:
        raise ValueError(f"cannot decode image file {path!r}: {e}") from None
    if "image_mean" in data_config:
        return photo.photo_transform(data_config).eval(image)
    return normalize(photo.resize_center_crop(image, int(data_config.image_size)))


def caption_files(config: ml_collections.ConfigDict, workdir: str, paths: Sequence[str],
                  step: int | None = None) -> list[str]:
    """One caption per image file, from the latest (or given) checkpoint in workdir."""
    from vlp_jax.train.trainer import restore_experiment
    if not paths:
        raise ValueError("no image files given (--images FILE ...)")
    images = np.stack([load_image(p, config.data) for p in paths])
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
