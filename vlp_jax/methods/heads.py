"""A Flax wrapper that adds an objective's extra heads (SLIP's SimCLR projector, A-CLIP's
projector / predictor, MaskCLIP's decoders) to a built model, initialised by Flax.

`WithHeads(base, heads)` shares its scope with `base` (`nn.share_scope`), so the parameter
tree stays flat: the base model's top-level names (`image_tower`, `text_tower`, `image_proj`,
`text_proj`, `logit_scale`, ...) and one top-level entry per head (e.g. `slip_head`). The base
model applied to these parameters ignores the heads' entries, so the predict functions and
every helper that applies the base model work unchanged.

heads: tuple of (name, module, example) where `example(base, images, tokens)` returns the
head's example call arguments (computed from the base model inside `init`, so a head is
sized from the real feature widths).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn


class WithHeads(nn.Module):
    base: nn.Module
    heads: tuple[tuple[str, nn.Module, Callable[..., tuple]], ...] = ()

    def setup(self):
        nn.share_scope(self, self.base)
        for name, module, _ in self.heads:
            setattr(self, name, module.clone())

    def __call__(self, images, tokens):
        """Initialises the base model and every head: returns the base model's outputs."""
        out = self.base(images, tokens)
        for name, _, example in self.heads:
            getattr(self, name)(*example(self.base, images, tokens))
        return out

    def head(self, name: str, *args) -> Any:
        """Applies head `name` to `args`."""
        return getattr(self, name)(*args)


def head_fn(wrapper: WithHeads) -> Callable:
    """apply_head(params, name, *args): the head `name` of `wrapper` applied with `params`
    (the flat tree; only the head's entry is read)."""
    def apply_head(params, name, *args):
        return wrapper.apply({"params": params}, name, *args, method="head")
    return apply_head
