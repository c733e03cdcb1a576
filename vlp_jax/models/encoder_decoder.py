"""Image-text encoder-decoder: SimVLM's PrefixLM model (Wang et al. 2022, "SimVLM: Simple Visual
Language Model Pretraining with Weak Supervision"), the shape VL-T5 shares.

    v = TokenProjection(ViT(images).tokens)                   [B, T, W]
    encoder (bidirectional) over [v ; E(prefix) + P]           memory [B, T + L, W]
    decoder (causal self-attention, cross-attention to the memory) over E(suffix) + P
    logits_t = LMHead(.)  predicts suffix_{t+1}               (BERT transform, tied to E)

PrefixLM (SimVLM eq. 2): a caption `bos w_1 .. w_n eos` is cut at a prefix length p drawn per
example; the encoder reads the image and `bos w_1 .. w_p` bidirectionally, and the loss is
L = - sum_{t > p} log P(w_t | v, w_<=p, w_p+1..t-1) over the suffix only. p = 0 is plain
captioning (how captions are generated). The word embeddings E are shared by encoder and
decoder (as SimVLM / T5).
Deviations: (1) the decoder reads the whole caption `bos w_1 .. w_{t-1}` causally (the prefix
too, with the loss masked to the suffix) where SimVLM's decoder reads the suffix alone: with
the suffix alone, the toy-scale decoder had to infer p from the memory before it could use
the image and stayed at chance on colour (11.7% after 600 steps, chance 12.5%); the prefix is
still in the encoder, and p = 0 (generation) is unchanged. `split_prefix` gives SimVLM's
suffix layout. (2) SimVLM's image input is a ResNet stem's patches; here a ViT's tokens (its
own layers count as extra encoder depth).

VL-T5 (Cho et al. 2021) is the same network with the split given as text: a task input
`prompt` ("vqa: <question>") in the encoder with the image, and the whole target text (the
answer) predicted by the decoder, L = - sum_t log P(y_t | v, prompt, y_<t).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.generation import shifted_lm_outputs
from vlp_jax.models.git import image_token_count
from vlp_jax.models.registry import build_image_tower, model_dtype, register_model, stack_kwargs
from vlp_jax.nn.attention import causal_mask, make_attention_mask
from vlp_jax.nn.embed import TokenEmbedding
from vlp_jax.nn.heads import PredictionHead, TokenProjection
from vlp_jax.nn.transformer import Encoder


def split_prefix(tokens: jax.Array, prefix_len: jax.Array, pad_id: int
                 ) -> tuple[jax.Array, jax.Array]:
    """PrefixLM split of captions tokens [B, L] (`bos w_1 .. eos pad`) at p = prefix_len [B]
    (words in the prefix, 0 <= p): (prefix [B, L] = `bos w_1 .. w_p pad ..`,
    suffix [B, L] = `bos w_{p+1} .. eos pad ..`), int32."""
    b, length = tokens.shape
    j = jnp.arange(length)[None, :]
    p = jnp.asarray(prefix_len, jnp.int32).reshape(b, 1)
    prefix = jnp.where(j <= p, tokens, pad_id)
    src = jnp.where(j == 0, 0, j + p)
    suffix = jnp.take_along_axis(tokens, jnp.minimum(src, length - 1), axis=1)
    suffix = jnp.where(src < length, suffix, pad_id)
    return prefix.astype(jnp.int32), suffix.astype(jnp.int32)


class EncoderDecoder(nn.Module):
    """See the module docstring.

    Attributes: image_tower (ViT); vocab_size, width, encoder_depth, decoder_depth, num_heads,
    mlp_dim, context_length, pad_id, bos_id; stack options; decode.
    Call: images [B, S, S, 3], tokens int [B, L], prefix_len int [B] (None: 0, captioning) ->
    dict(lm_logits [B, L-1, V], lm_targets, lm_weights) over the suffix; or, with prompt int
    [B, Lp] (VL-T5), the encoder reads [image; prompt] and every token of `tokens` after bos
    is a target (no prefix split).
    """

    image_tower: nn.Module
    vocab_size: int
    width: int
    encoder_depth: int
    decoder_depth: int
    num_heads: int
    mlp_dim: int
    context_length: int
    pad_id: int = 0
    bos_id: int = 1
    remat: bool = False
    dtype: Any = jnp.float32
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False
    attention_implementation: str | None = None
    dropout_rate: float = 0.0
    deterministic: bool = True
    decode: bool = False

    def setup(self):
        image_token_count(self.image_tower)
        stack = dict(remat=self.remat, dtype=self.dtype, remat_policy=self.remat_policy,
                     scan_layers=self.scan_layers, dropout_rate=self.dropout_rate,
                     attention_implementation=self.attention_implementation)
        self.visual_proj = TokenProjection(self.width, self.dtype)
        self.token_embed = TokenEmbedding(self.vocab_size, self.width, self.context_length,
                                          dtype=self.dtype, decode=self.decode)
        self.encoder = Encoder(self.encoder_depth, self.num_heads, self.mlp_dim, **stack)
        self.decoder = Encoder(self.decoder_depth, self.num_heads, self.mlp_dim,
                               cross_attention_every=1, decode=self.decode,
                               max_decode_length=self.context_length, **stack)
        self.lm_head = PredictionHead(self.vocab_size, tied=True, bias_axis="vocab",
                                      dtype=self.dtype)

    def encode(self, images, prefix):
        """images, prefix tokens [B, Lp] -> (memory [B, T + Lp, W], memory_valid [B, T + Lp]).
        Prefix positions are those of a non-decoding embedding (0 .. Lp-1)."""
        v = self.visual_proj(self.image_tower(images)[1])
        x = self.token_embed.embed_tokens(prefix) + self.token_embed.pos_embedding[
            :prefix.shape[1]].astype(self.dtype)
        x = jnp.concatenate([v, x], axis=1)
        valid = jnp.concatenate([jnp.ones(v.shape[:2], bool), prefix != self.pad_id], axis=1)
        return self.encoder(x, mask=make_attention_mask(valid, valid),
                            deterministic=self.deterministic), valid

    def _decode(self, tokens, memory, memory_valid, mask):
        q_valid = jnp.ones(tokens.shape, bool)
        y = self.decoder(self.token_embed(tokens), mask=mask, context=memory,
                         context_mask=make_attention_mask(q_valid, memory_valid),
                         deterministic=self.deterministic)
        return self.lm_head(y, self.token_embed.embedding)

    def __call__(self, images, tokens, prefix_len=None, prompt=None):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        if prompt is not None and prefix_len is not None:
            raise ValueError("give a prompt or a prefix_len, not both")
        if prompt is None:
            if prefix_len is None:
                prefix_len = jnp.zeros(tokens.shape[:1], jnp.int32)
            prompt, _ = split_prefix(tokens, prefix_len, self.pad_id)
        memory, memory_valid = self.encode(images, prompt)
        valid = tokens != self.pad_id
        mask = causal_mask(tokens.shape[1]) & valid[:, None, None, :]
        out = shifted_lm_outputs(self._decode(tokens, memory, memory_valid, mask), tokens,
                                 self.pad_id)
        if prefix_len is None:               # a prompt: every target token is predicted
            return out
        # targets w_{t+1} with t + 1 > p only: the prefix is given, not predicted
        target_pos = jnp.arange(1, tokens.shape[1])[None, :]
        in_suffix = target_pos > jnp.asarray(prefix_len, jnp.int32)[:, None]
        return dict(out, lm_weights=out["lm_weights"] * in_suffix.astype(jnp.float32))

    def prefill(self, images, prompt=None):
        """(decode=True) the memory of the image with the prompt [B, Lp] (VL-T5's task input),
        or with an empty prefix (`bos`) without one."""
        if prompt is None:
            prompt = jnp.full((images.shape[0], 1), self.bos_id, jnp.int32)
        memory, valid = self.encode(images, prompt)
        return {"memory": memory, "memory_valid": valid}

    def step(self, context, tokens):
        """(decode=True) tokens [B, 1] -> next-token logits [B, 1, V]."""
        return self._decode(tokens, context["memory"], context["memory_valid"], None)


@register_model("encoder_decoder")
def build_encoder_decoder(cfg, vocab: dict) -> EncoderDecoder:
    """model (name='encoder_decoder'): image (a ViT), width, encoder_depth, decoder_depth,
    num_heads, mlp_dim, context_length."""
    dtype, stack = model_dtype(cfg), stack_kwargs(cfg)
    return EncoderDecoder(image_tower=build_image_tower(cfg.image, dtype=dtype, **stack),
                          vocab_size=vocab["vocab_size"], width=cfg.width,
                          encoder_depth=cfg.encoder_depth, decoder_depth=cfg.decoder_depth,
                          num_heads=cfg.num_heads, mlp_dim=cfg.get("mlp_dim", 4 * cfg.width),
                          context_length=cfg.context_length, pad_id=vocab["pad_id"],
                          bos_id=vocab["bos_id"], dtype=dtype, **stack)
