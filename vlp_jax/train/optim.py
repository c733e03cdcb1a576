"""Optimizer from `config.optim`: AdamW, linear warmup + cosine decay, global-norm clipping.

Weight decay applies to matrices (ndim >= 2) only, not to biases, LayerNorm parameters,
the temperature or position tables' bias-like 1-D arrays. Parameters marked frozen (LiT's
locked tower) get zero updates and no optimizer moments.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr` over `cfg.warmup_steps`, then cosine to `lr * end_factor`."""
    warmup = min(int(cfg.get("warmup_steps", 0)), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.get("end_factor", 0.0))


def decay_mask(params) -> Any:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                   trainable: Any | None = None) -> optax.GradientTransformation:
    """optax chain: clip_by_global_norm -> adamw(schedule, b1, b2, eps, wd on matrices).

    `trainable`: optional bool tree like params; False leaves are frozen (zero update).
    """
    name = cfg.get("name", "adamw")
    if name != "adamw":
        raise ValueError(f"optim.name {name!r} is unknown; valid: ['adamw']")
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.get("grad_clip_norm", 1.0)),
        optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.get("b1", 0.9),
                    b2=cfg.get("b2", 0.98), eps=cfg.get("eps", 1e-6),
                    weight_decay=cfg.get("weight_decay", 0.1), mask=decay_mask))
    if trainable is None:
        return tx
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
