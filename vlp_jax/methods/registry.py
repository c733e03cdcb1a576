"""Resolves `config.method.name` to a Method class: the one place a method name is looked up."""
from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from vlp_jax.methods.base import Method
from vlp_jax.methods.aclip import AClipMethod
from vlp_jax.methods.albef import AlbefMethod
from vlp_jax.methods.contrastive import ContrastiveMethod
from vlp_jax.methods.laclip import LaClipMethod
from vlp_jax.methods.maskclip import MaskClipMethod
from vlp_jax.methods.slip import SlipMethod
from vlp_jax.methods.vilt import ViltMethod
from vlp_jax.models.registry import build_model

METHODS: dict[str, type[Method]] = {"contrastive": ContrastiveMethod}
METHODS.update(slip=SlipMethod, laclip=LaClipMethod, aclip=AClipMethod, maskclip=MaskClipMethod)
METHODS.update(vilt=ViltMethod, albef=AlbefMethod)


def build_method(config: ml_collections.ConfigDict, vocab: dict, mesh: Mesh) -> Method:
    name = config.method.name
    if name not in METHODS:
        raise ValueError(f"method.name {name!r} is unknown; valid: {sorted(METHODS)}")
    return METHODS[name](model=build_model(config.model, vocab), mesh=mesh, config=config.method,
                         vocab=dict(vocab))
