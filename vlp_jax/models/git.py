"""GIT (Wang et al. 2022, "GIT: A Generative Image-to-text Transformer"): an image encoder whose
tokens, projected, open the sequence of ONE transformer decoder; the caption follows them.

    v = TokenProjection(ViT(images).tokens)            [B, T, W]   (Dense + LayerNorm)
    x = [v ; E(w_0 .. w_{L-1}) + P]                    [B, T + L, W]
    h = Encoder(x, mask = prefix_mask(T + L, T) & key not padding)
    logits_t = LMHead(h_{T + t})  predicts w_{t+1}     (BERT transform, tied to E)

The mask is GIT's: the image tokens attend to each other bidirectionally (and never to the
text), text token t attends to every image token and to text tokens <= t. Decoding prefills the
image tokens into the key/value cache under that mask, then feeds one text token per step.
Deviation: GIT's image encoder is a pretrained (CLIP / Florence) ViT and its decoder a randomly
initialised BERT-base; here both train from scratch at the experiment's size.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlp_jax.models.generation import shifted_lm_outputs
from vlp_jax.models.registry import build_image_tower, model_dtype, register_model, stack_kwargs
from vlp_jax.nn.attention import prefix_mask
from vlp_jax.nn.embed import TokenEmbedding
from vlp_jax.nn.heads import PredictionHead, TokenProjection
from vlp_jax.nn.transformer import Encoder


def image_token_count(tower: nn.Module) -> int:
    """T of an image tower with a `num_tokens` property (ViT); a clear error otherwise."""
    if not hasattr(tower, "num_tokens"):
        raise ValueError(f"generative models need a ViT image tower (tokens of a fixed count); "
                         f"got {type(tower).__name__}")
    return int(tower.num_tokens)


class GIT(nn.Module):
    """See the module docstring.

    Attributes: image_tower (ViT); vocab_size, width, depth, num_heads, mlp_dim,
    context_length (the longest caption, bos..eos), pad_id; stack options; decode.
    Call: images [B, S, S, 3], tokens int [B, L] -> dict(lm_logits [B, L-1, V],
    lm_targets [B, L-1], lm_weights [B, L-1]) (see `models.generation`).
    """

    image_tower: nn.Module
    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    context_length: int
    pad_id: int = 0
    remat: bool = False
    dtype: Any = jnp.float32
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False
    attention_implementation: str | None = None
    dropout_rate: float = 0.0
    deterministic: bool = True
    decode: bool = False

    def setup(self):
        self.num_image_tokens = image_token_count(self.image_tower)
        self.visual_proj = TokenProjection(self.width, self.dtype)
        self.token_embed = TokenEmbedding(self.vocab_size, self.width, self.context_length,
                                          dtype=self.dtype, decode=self.decode)
        self.decoder = Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat,
                               dtype=self.dtype, remat_policy=self.remat_policy,
                               scan_layers=self.scan_layers, dropout_rate=self.dropout_rate,
                               attention_implementation=self.attention_implementation,
                               decode=self.decode,
                               max_decode_length=self.num_image_tokens + self.context_length)
        self.lm_head = PredictionHead(self.vocab_size, tied=True, bias_axis="vocab",
                                      dtype=self.dtype)

    def image_context(self, images):
        """images [B, S, S, 3] -> projected image tokens [B, T, W]."""
        return self.visual_proj(self.image_tower(images)[1])

    def _logits(self, h):
        return self.lm_head(h, self.token_embed.embedding)

    def __call__(self, images, tokens):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        v = self.image_context(images)
        t, length = v.shape[1], tokens.shape[1]
        x = jnp.concatenate([v, self.token_embed(tokens)], axis=1)
        keys = jnp.concatenate([jnp.ones(v.shape[:2], bool), tokens != self.pad_id], axis=1)
        mask = prefix_mask(t + length, t) & keys[:, None, None, :]
        h = self.decoder(x, mask=mask, deterministic=self.deterministic)
        return shifted_lm_outputs(self._logits(h[:, t:]), tokens, self.pad_id)

    def prefill(self, images):
        """(decode=True) writes the image tokens into the cache, bidirectionally; returns {}."""
        v = self.image_context(images)
        t = v.shape[1]
        mask = prefix_mask(t + self.context_length, t)[..., :t, :]
        self.decoder(v, mask=mask, deterministic=True)
        return {}

    def step(self, context, tokens):
        """(decode=True) tokens [B, 1] -> next-token logits [B, 1, V]."""
        h = self.decoder(self.token_embed(tokens), deterministic=True)
        return self._logits(h)


@register_model("git")
def build_git(cfg, vocab: dict) -> GIT:
    """model (name='git'): image (a ViT), width, depth, num_heads, mlp_dim, context_length."""
    dtype, stack = model_dtype(cfg), stack_kwargs(cfg)
    return GIT(image_tower=build_image_tower(cfg.image, dtype=dtype, **stack),
               vocab_size=vocab["vocab_size"], width=cfg.width, depth=cfg.depth,
               num_heads=cfg.num_heads, mlp_dim=cfg.get("mlp_dim", 4 * cfg.width),
               context_length=cfg.context_length, pad_id=vocab["pad_id"], dtype=dtype, **stack)
