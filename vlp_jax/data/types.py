"""Containers passed between the input pipeline, the trainer and the evaluators.

A *training batch* is a dict of host-local numpy arrays (the trainer turns it into global
`jax.Array`s on the mesh):

    image: float32 [B, H, W, 3], normalised to roughly [-1, 1]
    text:  int32   [B, L]  token ids, `bos ... eos pad pad`, pad id 0
    label: int32   [B]     class id of the scene's main object (for zero-shot / probes)

Methods that need more (a second augmented view, several captions) add keys; they never
change the meaning of these three.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A whole evaluation split held in host memory.

    Attributes:
      images: float32 [N, H, W, 3], preprocessed exactly as training images (no augmentation).
      captions: N lists of caption strings (COCO-style: several per image).
      labels: int32 [N] class ids into `class_names`.
      class_names: human-readable class names, e.g. "red circle".
      prompt_templates: zero-shot prompt templates with one `{}` for the class name.
      scenes: N structured scene descriptions (JSON-able dicts), for derived tasks.
    """

    images: np.ndarray
    captions: Sequence[Sequence[str]]
    labels: np.ndarray
    class_names: Sequence[str]
    prompt_templates: Sequence[str]
    scenes: Sequence[dict[str, Any]] = ()

    def __post_init__(self):
        n = self.images.shape[0]
        if self.images.ndim != 4:
            raise ValueError(f"EvalSet.images must be [N, H, W, C], got shape {self.images.shape}")
        if len(self.captions) != n or self.labels.shape[0] != n:
            raise ValueError(
                f"EvalSet sizes disagree: {n} images, {len(self.captions)} caption lists, "
                f"{self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return self.images.shape[0]

    def flat_captions(self) -> tuple[list[str], np.ndarray]:
        """All captions in one list and, for each, the index of its image: ([M], int32 [M])."""
        texts, owner = [], []
        for i, caps in enumerate(self.captions):
            texts.extend(caps)
            owner.extend([i] * len(caps))
        return texts, np.asarray(owner, dtype=np.int32)
