"""Builds models from `config.model` by name: the one place a model name is resolved.

Each builder takes the model ConfigDict and a `vocab` dict (vocab_size, pad_id, ...) that
the data pipeline's tokenizer supplies, and returns a Flax Linen module.
To add a model: write `build_<name>(cfg, vocab)` and register it in `_BUILDERS`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from vlp_jax.models.dual_encoder import DualEncoder
from vlp_jax.models.fusion import build_fusion_model
from vlp_jax.models.resnet import build_resnet
from vlp_jax.models.single_stream import build_single_stream
from vlp_jax.models.text import TextTransformer
from vlp_jax.models.vit import ViT

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(cfg) -> Any:
    name = cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_vit(cfg: ml_collections.ConfigDict, dtype=jnp.float32, remat=False) -> ViT:
    return ViT(patch_size=cfg.patch_size, width=cfg.width, depth=cfg.depth,
               num_heads=cfg.num_heads, mlp_dim=cfg.get("mlp_dim", 4 * cfg.width),
               image_size=cfg.image_size, pool=cfg.get("pool", "cls"), remat=remat, dtype=dtype)


def build_text(cfg: ml_collections.ConfigDict, vocab: dict, dtype=jnp.float32,
               remat=False) -> TextTransformer:
    return TextTransformer(vocab_size=vocab["vocab_size"], width=cfg.width, depth=cfg.depth,
                           num_heads=cfg.num_heads, mlp_dim=cfg.get("mlp_dim", 4 * cfg.width),
                           context_length=cfg.context_length, causal=cfg.get("causal", True),
                           pool=cfg.get("pool", "eot"), pad_id=vocab["pad_id"], remat=remat,
                           dtype=dtype)


IMAGE_TOWERS: dict[str, Callable[..., nn.Module]] = {"vit": build_vit, "resnet": build_resnet}


def build_image_tower(cfg, dtype=jnp.float32, remat=False) -> nn.Module:
    kind = cfg.get("type", "vit")
    if kind not in IMAGE_TOWERS:
        raise ValueError(f"model.image.type {kind!r} is unknown; valid: {sorted(IMAGE_TOWERS)}")
    return IMAGE_TOWERS[kind](cfg, dtype=dtype, remat=remat)


def build_dual_encoder(cfg: ml_collections.ConfigDict, vocab: dict) -> DualEncoder:
    dtype, remat = _dtype(cfg), cfg.get("remat", False)
    return DualEncoder(image_tower=build_image_tower(cfg.image, dtype, remat),
                       text_tower=build_text(cfg.text, vocab, dtype, remat),
                       embed_dim=cfg.embed_dim,
                       logit_scale_init=cfg.get("logit_scale_init", 2.6592600369262695),
                       logit_bias_init=cfg.get("logit_bias_init", None))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"dual_encoder": build_dual_encoder}
_BUILDERS.update(single_stream=build_single_stream, albef=build_fusion_model)


def build_model(cfg: ml_collections.ConfigDict, vocab: dict) -> nn.Module:
    """`cfg.name` selects the builder; raises ValueError naming the valid names."""
    if cfg.name not in _BUILDERS:
        raise ValueError(f"model.name {cfg.name!r} is unknown; valid: {sorted(_BUILDERS)}")
    return _BUILDERS[cfg.name](cfg, vocab)


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Adds a model builder (used by model families defined in their own modules)."""
    _BUILDERS[name] = builder


def register_image_tower(name: str, builder: Callable[..., nn.Module]) -> None:
    IMAGE_TOWERS[name] = builder
