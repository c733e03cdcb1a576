"""`config.frozen`: parameters the optimizer leaves fixed, chosen by regexes over their paths.

A parameter's path is its keys joined by '/', e.g. 'image_tower/encoder/block0/mlp/fc1/kernel'.
Each pattern is `re.fullmatch`ed against every path; a parameter matched by any pattern is
frozen. LiT locks its image side with ['image_tower/.*', 'image_proj/.*']; a fixed temperature
is ['logit_scale'].

Frozen parameters get no optimizer moments (`optax.multi_transform` with `set_to_zero`), a
zero update, and their gradient is replaced by zeros inside the train step, so XLA removes the
computation of those gradients (dead code) and they do not enter the global-norm clipping.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_of(key_path) -> str:
    """A jax key path -> 'a/b/c'."""
    return "/".join(_key_name(k) for k in key_path)


def param_paths(params: Any) -> list[str]:
    """'/'-joined paths of every leaf of `params`, in tree order."""
    return [path_of(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def compile_patterns(patterns: Sequence[str], key: str = "frozen") -> list[re.Pattern]:
    if isinstance(patterns, str):
        raise ValueError(f"config.{key} must be a list of regexes, got the string {patterns!r}")
    out = []
    for pattern in patterns:
        try:
            out.append(re.compile(str(pattern)))
        except re.error as e:
            raise ValueError(f"config.{key}: {pattern!r} is not a valid regex ({e})") from None
    return out


def trainable_mask(params: Any, patterns: Sequence[str]) -> Any | None:
    """Bool tree like `params` (True = trained, False = frozen), or None when `patterns` is
    empty (everything trains).

    Raises ValueError naming a pattern that matches no parameter (a typo would otherwise
    silently train what was meant to be frozen), with the top-level parameter names.
    """
    compiled = compile_patterns(tuple(patterns or ()))
    if not compiled:
        return None
    paths = param_paths(params)
    for pattern in compiled:
        if not any(pattern.fullmatch(p) for p in paths):
            tops = sorted({p.split("/")[0] for p in paths})
            raise ValueError(f"config.frozen pattern {pattern.pattern!r} matches no parameter "
                             f"(patterns are re.fullmatch'ed against '/'-joined paths such as "
                             f"{paths[0]!r}; top-level names: {tops})")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.fullmatch(path_of(path)) for p in compiled), params)
