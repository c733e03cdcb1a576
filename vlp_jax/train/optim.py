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

from vlp_jax.config_schema import resolve_part


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr` over `cfg.warmup_steps`, then cosine to `lr * end_factor`
    (`cfg`: the `optim` section; defaults as declared in vlp_jax/train/fields.py)."""
    cfg = resolve_part("optim", cfg)
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.end_factor)


def decay_mask(params) -> Any:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                   trainable: Any | None = None) -> optax.GradientTransformation:
    """optax chain: clip_by_global_norm -> adamw(schedule, b1, b2, eps, wd on matrices).

    `trainable`: optional bool tree like params; False leaves are frozen (zero update).
    """
    cfg = resolve_part("optim", cfg)     # optim.name is one of the declared ('adamw')
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm),
        optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                    eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
    if trainable is None:
        return tx
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
