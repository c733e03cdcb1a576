"""Method registry: `config.method.name` -> Method class, the one place a method name is resolved.

A method family is one module that registers its class with a decorator:

    from vlp_jax.methods.registry import register_method

    @register_method("my_method")
    @dataclasses.dataclass
    class MyMethod(Method): ...

The built-in methods are imported lazily by `build_method` (BUILTIN_MODULES), so this module
imports no method module; a method outside that list is found by importing its module first,
or by naming it in `method.module` (a dotted module path, as `model.module` does for models).
"""
from __future__ import annotations

import importlib
from typing import Callable

import ml_collections
from jax.sharding import Mesh

from vlp_jax.methods.base import Method
from vlp_jax.models.registry import build_model

BUILTIN_MODULES = ("vlp_jax.methods.contrastive", "vlp_jax.methods.slip",
                   "vlp_jax.methods.laclip", "vlp_jax.methods.aclip", "vlp_jax.methods.maskclip",
                   "vlp_jax.methods.vilt", "vlp_jax.methods.albef", "vlp_jax.methods.captioning")
METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """`@register_method(name)` on a Method subclass."""
    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} is registered twice ({METHODS[name].__name__} "
                             f"and {cls.__name__})")
        METHODS[name] = cls
        return cls
    return add


def method_class(config_method: ml_collections.ConfigDict) -> type[Method]:
    """The registered class of `config.method.name` (importing `method.module` first);
    raises ValueError naming the valid names."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    module = config_method.get("module", None)
    if module:
        importlib.import_module(module)
    name = config_method.name
    if name not in METHODS:
        raise ValueError(f"method.name {name!r} is unknown; valid: {sorted(METHODS)}")
    return METHODS[name]


def build_method(config: ml_collections.ConfigDict, vocab: dict, mesh: Mesh) -> Method:
    """The method of `config.method` around the model of `config.model`."""
    cls = method_class(config.method)
    return cls(model=build_model(config.model, vocab), mesh=mesh, config=config.method,
               vocab=dict(vocab))
