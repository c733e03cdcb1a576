"""Model registry: `config.model.name` -> builder, and the shared builder helpers.

A model family is one module that registers its builder with a decorator:

    from vlp_jax.models.registry import register_model, stack_kwargs

    @register_model("my_model")
    def build_my_model(cfg, vocab): return MyModel(..., **stack_kwargs(cfg))

Each builder takes the model ConfigDict and a `vocab` dict (vocab_size, pad_id, ...) that the
data pipeline's tokenizer supplies, and returns a Flax Linen module. The built-in families are
imported lazily by `build_model` (BUILTIN_MODULES), so this module imports no model module and
there is no import cycle; a family outside that list is found by importing its module before
`build_model` runs, or by naming it in `model.module` (a dotted module path, as big_vision
imports models by name).

Image towers register the same way (`@register_image_tower("vit")`) and are chosen by
`model.image.type`.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from vlp_jax.nn.attention import IMPLEMENTATIONS
from vlp_jax.nn.transformer import REMAT_POLICIES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BUILTIN_MODULES = ("vlp_jax.models.vit", "vlp_jax.models.resnet", "vlp_jax.models.dual_encoder",
                   "vlp_jax.models.fusion", "vlp_jax.models.single_stream",
                   "vlp_jax.models.git", "vlp_jax.models.encoder_decoder", "vlp_jax.models.coca")

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
IMAGE_TOWERS: dict[str, Callable[..., nn.Module]] = {}


def _register(table: dict, name: str, builder: Callable | None):
    def add(fn):
        table[name] = fn
        return fn
    return add if builder is None else add(builder)


def register_model(name: str, builder: Callable[..., nn.Module] | None = None):
    """`@register_model(name)` on a builder(cfg, vocab), or register_model(name, builder)."""
    return _register(_BUILDERS, name, builder)


def register_image_tower(name: str, builder: Callable[..., nn.Module] | None = None):
    """`@register_image_tower(name)` on a builder(cfg, dtype=, **stack_kwargs)."""
    return _register(IMAGE_TOWERS, name, builder)


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def model_dtype(cfg) -> Any:
    name = cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


_dtype = model_dtype   # the old private name


def stack_kwargs(cfg) -> dict:
    """The transformer-stack options of `config.model`, shared by every tower of the model:
    remat, remat_policy, scan_layers, attention_implementation, dropout_rate.

    Raises ValueError on an unknown remat_policy / attention_implementation, and on
    dropout_rate > 0: the blocks implement dropout (`deterministic=False` with a 'dropout'
    rng), but the methods do not yet pass a dropout rng to `model.apply`, so a positive rate
    could not take effect.
    """
    policy = cfg.get("remat_policy", "nothing_saveable")
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy must be one of {REMAT_POLICIES}, got {policy!r}")
    impl = cfg.get("attention_implementation", None)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention_implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {impl!r}")
    rate = float(cfg.get("dropout_rate", 0.0))
    if rate < 0.0 or rate >= 1.0:
        raise ValueError(f"model.dropout_rate must be in [0, 1), got {rate}")
    if rate > 0.0:
        raise ValueError(f"model.dropout_rate={rate}: dropout is implemented in the blocks "
                         "(vlp_jax.nn.transformer) but the training methods do not pass a "
                         "'dropout' rng to model.apply yet; use 0.0")
    return dict(remat=bool(cfg.get("remat", False)), remat_policy=policy,
                scan_layers=bool(cfg.get("scan_layers", False)), attention_implementation=impl,
                dropout_rate=rate)


def build_image_tower(cfg, dtype=jnp.float32, remat=False, **stack) -> nn.Module:
    """`cfg.type` ('vit' by default) selects the registered image-tower builder."""
    _load_builtins()
    kind = cfg.get("type", "vit")
    if kind not in IMAGE_TOWERS:
        raise ValueError(f"model.image.type {kind!r} is unknown; valid: {sorted(IMAGE_TOWERS)}")
    return IMAGE_TOWERS[kind](cfg, dtype=dtype, remat=remat, **stack)


def build_model(cfg: ml_collections.ConfigDict, vocab: dict) -> nn.Module:
    """`cfg.name` selects the builder; raises ValueError naming the valid names."""
    _load_builtins()
    module = cfg.get("module", None)
    if module:
        importlib.import_module(module)
    if cfg.name not in _BUILDERS:
        raise ValueError(f"model.name {cfg.name!r} is unknown; valid: {sorted(_BUILDERS)}")
    return _BUILDERS[cfg.name](cfg, vocab)


def __getattr__(name: str):
    """Old import sites: `from vlp_jax.models.registry import build_vit / build_text /
    build_dual_encoder` keep working (resolved lazily to avoid an import cycle)."""
    lazy = {"build_vit": "vlp_jax.models.vit", "build_text": "vlp_jax.models.text",
            "build_dual_encoder": "vlp_jax.models.dual_encoder"}
    if name in lazy:
        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(name)
