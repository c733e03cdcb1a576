"""LaCLIP (Fan et al. 2023): language augmentation for CLIP.

Each image comes with several texts: its original caption(s) and rewrites of them (LaCLIP
rewrites with an LLM; here any JSON-lines source, `vlp_jax.data.rewrites`, merged into the
candidates by the data pipeline). Every step, every example's text is drawn uniformly at random
among its candidates, inside the jitted loss from the step's key:

    t_i ~ Uniform{T_i1, ..., T_iK_i},      L = L_CLIP(f(x_i), g(t_i))

Candidates come as `batch[captions_key]` int32 [B, K, L] (`data.all_captions=True`); a row whose
first token is the pad id is an absent candidate (examples may have fewer than K), and an example
with no candidate row falls back to `batch['text']`. Evaluation is the plain dual encoder.

The draw is the method's `prepare_batch` step (run once per step before differentiation, so
GradCache's micro-batches see the drawn texts); the loss takes the prepared batch. Metric:
`laclip/caption_index_mean`.

config.method fields (besides ContrastiveMethod's):
  captions_key: the batch key of the candidates.
  sampling: 'uniform' (LaCLIP) or 'first' (always candidate 0: the no-augmentation baseline).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vlp_jax.methods.contrastive import ContrastiveMethod
from vlp_jax.methods.ssl_common import require_key
from vlp_jax.methods.registry import register_method

SAMPLING = ("uniform", "first")
DEFAULT_CAPTIONS_KEY = "captions"


def sample_captions(rng: jax.Array, candidates: jax.Array, fallback: jax.Array, pad_id: int,
                    sampling: str = "uniform") -> tuple[jax.Array, jax.Array]:
    """One candidate per example.

    candidates int [B, K, L]; fallback int [B, L] (used where an example has no candidate).
    Returns (tokens int [B, L], chosen index int32 [B]; -1 where the fallback was used).
    """
    if sampling not in SAMPLING:
        raise ValueError(f"method.sampling {sampling!r} is unknown; valid: {SAMPLING}")
    if candidates.ndim != 3 or candidates.shape[-1] != fallback.shape[-1]:
        raise ValueError(f"caption candidates must be [B, K, {fallback.shape[-1]}], "
                         f"got {candidates.shape}")
    present = candidates[:, :, 0] != pad_id                                    # [B, K]
    if sampling == "uniform":
        logits = jnp.where(present, 0.0, -jnp.inf)
        idx = jax.random.categorical(rng, jnp.where(present.any(-1, keepdims=True), logits, 0.0))
    else:
        idx = jnp.argmax(present, axis=-1)
    idx = idx.astype(jnp.int32)
    chosen = jnp.take_along_axis(candidates, idx[:, None, None], axis=1)[:, 0]
    has_any = present.any(-1)
    tokens = jnp.where(has_any[:, None], chosen, fallback).astype(fallback.dtype)
    return tokens, jnp.where(has_any, idx, -1)


@register_method("laclip")
@dataclasses.dataclass
class LaClipMethod(ContrastiveMethod):

    def setup(self):
        sampling = self.config.get("sampling", "uniform")
        if sampling not in SAMPLING:
            raise ValueError(f"method.sampling {sampling!r} is unknown; valid: {SAMPLING}")

    def choose_text(self, batch, rng):
        """(batch with `text` drawn among the candidates and the candidates dropped, index [B])."""
        key = self.config.get("captions_key", DEFAULT_CAPTIONS_KEY)
        require_key(batch, key, "LaCLIP", "data.all_captions=True")
        tokens, idx = sample_captions(rng, batch[key], batch["text"], self.vocab.get("pad_id", 0),
                                      self.config.get("sampling", "uniform"))
        rest = {k: v for k, v in batch.items() if k != key}
        return dict(rest, text=tokens), idx

    def prepare_batch(self, batch, rng):
        """Draws each example's text among its candidates (once per step, before
        differentiation), keeping the chosen index as batch['caption_index'] int32 [B]; then
        ContrastiveMethod's preparation (FLIP masks)."""
        k_text, k_rest = jax.random.split(rng)
        batch, idx = self.choose_text(batch, k_text)
        return super().prepare_batch(dict(batch, caption_index=idx), k_rest)

    def loss(self, params, aux, batch, rng, step, masked=True):
        key = self.config.get("captions_key", DEFAULT_CAPTIONS_KEY)
        if key in batch or "caption_index" not in batch:
            raise ValueError("LaCLIP's loss takes a prepared batch (method.prepare_batch draws "
                             "the captions); this one has not been prepared")
        loss, metrics, aux = super().loss(params, aux, batch, rng, step, masked)
        return loss, dict(metrics, **caption_metrics(batch)), aux

    def value_and_grad(self, params, aux, batch, rng, step):
        """ContrastiveMethod's gradient path (FLIP masking, GradCache and plain accumulation
        included) on the batch with the drawn texts."""
        prepared = self.prepare_batch(batch, self.prepare_key(rng))
        idx_metrics = caption_metrics(prepared)
        (loss, (metrics, aux)), grads = super().value_and_grad(params, aux, batch, rng, step)
        return (loss, (dict(metrics, **idx_metrics), aux)), grads


def caption_metrics(batch: dict) -> dict:
    """laclip/caption_index_mean: the mean chosen candidate index (-1 = fallback)."""
    return {"laclip/caption_index_mean": jnp.mean(batch["caption_index"].astype(jnp.float32))}
