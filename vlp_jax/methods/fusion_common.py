"""What the fusion methods (ViLT / UNITER single stream, ALBEF and co-attention) share."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn

from vlp_jax.methods.base import model_predict_fn

FUSION_PREDICT_FNS = ("encode_image", "encode_text", "score_pairs")


def fusion_predict_fns(model: nn.Module) -> dict[str, Callable]:
    """encode_image / encode_text (unit-norm [B, D]) and score_pairs(params, images, tokens)
    -> [B] (the ITM head's match score) of a fusion model, as pure functions of the params."""
    return {name: model_predict_fn(model, name) for name in FUSION_PREDICT_FNS}
