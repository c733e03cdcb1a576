"""Multi-head dot-product attention (self- or cross-), mask helpers, and a decoding cache.

Implements Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + mask) V of Vaswani et al. (2017),
eq. 1, with h heads projected from and back to the model width.

The product goes through `jax.nn.dot_product_attention` (its `implementation`: 'xla', or 'cudnn'
for cuDNN flash attention on GPUs; None lets JAX choose) except on a CPU backend with
implementation None, where `heads_major_attention` computes the same function with heads-major
batched matmuls (faster on XLA:CPU: `benchmarks/README.md`, "Train-step throughput"). When the
caller asks for the attention probabilities (`return_weights=True`: A-CLIP's token scores,
alignment maps) the explicit einsum + softmax path is used, since fused kernels never
materialise them.

Masks are bool, True = may attend, broadcastable to [B, h, Q, K]:
  make_attention_mask(q_valid, k_valid)   padding
  causal_mask(L)                          position i sees positions <= i (decoders, CLIP text)
  prefix_mask(L, prefix_len)              bidirectional over a prefix, causal after it (SimVLM's
                                          PrefixLM; prefix_len [B] per example)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.nn.partitioning import dense_init, zeros

IMPLEMENTATIONS = (None, "xla", "cudnn")


def make_attention_mask(query_valid: jax.Array, key_valid: jax.Array) -> jax.Array:
    """bool [B, 1, Q, K] mask from validity vectors query_valid [B, Q] and key_valid [B, K]."""
    return (query_valid[:, None, :, None] & key_valid[:, None, None, :])


def causal_mask(length: int) -> jax.Array:
    """bool [1, 1, L, L] lower-triangular mask: position i attends to positions <= i."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def prefix_mask(length: int, prefix_len: jax.Array | int) -> jax.Array:
    """PrefixLM mask (SimVLM, Wang et al. 2022): bool [B|1, 1, L, L].

    Query i may attend key j iff j <= i (causal) or j < prefix_len (the prefix is seen
    bidirectionally by every position). prefix_len: int or int [B].
    """
    prefix_len = jnp.asarray(prefix_len, jnp.int32).reshape(-1, 1, 1, 1)
    i = jnp.arange(length)[None, None, :, None]
    j = jnp.arange(length)[None, None, None, :]
    return (j <= i) | (j < prefix_len)


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(d) masked): q [B, Q, h, d], k [B, K, h, d] -> float32 [B, h, Q, K].

    A row whose keys are all masked gets uniform weights (the finfo.min fill), as the fused
    path does.
    """
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(d) masked) v: q [B, Q, h, d], k, v [B, K, h, d] -> [B, Q, h, d].

    The function of `jax.nn.dot_product_attention(implementation='xla')` (logits and softmax
    in float32; masked logits filled with a large negative number, here the float32 minimum,
    so a row whose keys are all masked gets uniform weights in both), laid out for XLA:CPU: q, k, v are moved to [B, h, L, d]
    once and both products are plain batched matmuls over (B, h), instead of the generic
    path's grouped-query [B, K_groups, ...] layout; q is scaled before the product (B Q h d
    multiplies instead of B h Q K). The backward pass is `_heads_major_core`'s.
    """
    scale = jnp.asarray(1.0 / (q.shape[-1] ** 0.5), q.dtype)
    qh = jnp.swapaxes(q * scale, 1, 2)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    return jnp.swapaxes(_heads_major_core(qh, kh, vh, mask), 1, 2)


@jax.custom_vjp
def _heads_major_core(qh: jax.Array, kh: jax.Array, vh: jax.Array,
                      mask: jax.Array | None) -> jax.Array:
    """O = softmax(S) V with S = qh kh^T masked: qh [B, h, Q, d], kh, vh [B, h, K, d] ->
    [B, h, Q, d]. Its backward pass is flash attention's (Dao et al. 2022, Alg. 2 / 4) without
    the tiling, with P kept from the forward pass:

        dV = P^T dO,  dP = dO V^T,  D = rowsum(dO * O),  dS = P * (dP - D),
        dQ = dS K,  dK = dS^T Q

    (D equals rowsum(P * dP), which autodiff of the softmax computes, but is a sum over the
    head dim d instead of over the K keys); dS is zeroed at masked logits, as the gradient of
    the masking `where` is. On XLA:CPU it made the CLIP train step (`main` config) 4.6% faster
    than autodiff's backward (median; benchmarks/README.md).
    """
    return _heads_major_forward(qh, kh, vh, mask)[0]


def _heads_major_forward(qh, kh, vh, mask):
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(vh.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, vh)
    return out, (qh, kh, vh, mask, weights, out)


def _heads_major_backward(residuals, d_out):
    qh, kh, vh, mask, weights, out = residuals
    d_v = jnp.einsum("bhqk,bhqd->bhkd", weights, d_out.astype(weights.dtype))
    d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_out, vh, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    d_logits = weights.astype(jnp.float32) * (d_weights - row)
    if mask is not None:
        d_logits = jnp.where(mask, d_logits, 0.0)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits.astype(qh.dtype), kh)
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits.astype(qh.dtype), qh)
    return d_q, d_k.astype(kh.dtype), d_v.astype(vh.dtype), None


_heads_major_core.defvjp(_heads_major_forward, _heads_major_backward)


def _use_heads_major(implementation: str | None) -> bool:
    """implementation None on a CPU backend: `heads_major_attention` (see the module doc)."""
    return implementation is None and jax.default_backend() == "cpu"


class MultiHeadAttention(nn.Module):
    """Multi-head attention.

    Attributes:
      num_heads: number of heads h; the per-head dim is width // h.
      dtype: compute dtype (parameters stay float32).
      implementation: `jax.nn.dot_product_attention`'s implementation (None, 'xla', 'cudnn');
        None on a CPU backend selects `heads_major_attention` (same function, faster there).
      decode: incremental decoding (self-attention only). The keys and values of every step
        are kept in the 'cache' collection (`cached_key`, `cached_value` [B, max_decode_length,
        h, d], `cache_index` []); a call with Q new tokens writes them at cache_index, attends
        causally over everything written so far and advances the index by Q. The cache is
        created (zeros, index 0) by `init` with decode=True and must be passed back mutable:
        `apply({'params': p, 'cache': c}, x, mutable=['cache'])`. With a `mask` in this mode,
        the mask [B|1, 1, Q, max_decode_length] is over absolute key positions and replaces
        the causal rule (ANDed with "written so far"): a prefill of a bidirectional prefix
        (GIT's image tokens, SimVLM's prefix) passes `prefix_mask(max_decode_length, P)[..., :Q, :]`.
      max_decode_length: the cache length (the longest sequence that can be decoded).

    Call:
      inputs_q: [B, Q, W]; inputs_kv: [B, K, W'] (defaults to inputs_q: self-attention).
      mask: optional bool broadcastable to [B, h, Q, K]; True = may attend. In decode mode K is
        max_decode_length and the causal part over absolute positions is added here.
      return_weights: also return the attention probabilities [B, h, Q, K] (float32), computed
        by the explicit einsum + softmax path.
    Returns:
      [B, Q, W] (and the weights if asked).
    """

    num_heads: int
    dtype: Any = jnp.float32
    implementation: str | None = None
    decode: bool = False
    max_decode_length: int = 0

    def _update_cache(self, k, v, mask):
        """Writes k, v [B, Q, h, d] at cache_index; returns all cached k, v and the mask."""
        b, q_len, h, d = k.shape
        if self.max_decode_length < 1:
            raise ValueError("MultiHeadAttention(decode=True) needs max_decode_length >= 1")
        initialized = self.has_variable("cache", "cached_key")
        shape = (b, self.max_decode_length, h, d)
        cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:      # init: shape the cache, attend over the given tokens only
            return k, v, None if mask is None else mask[..., :q_len]
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
        index.value = i + q_len
        key_pos = jnp.arange(self.max_decode_length)[None, :]
        if mask is None:         # causal over absolute positions
            q_pos = i + jnp.arange(q_len)
            return cached_k.value, cached_v.value, (key_pos <= q_pos[:, None])[None, None]
        # the caller's mask over absolute key positions, limited to the keys written so far
        return cached_k.value, cached_v.value, mask & (key_pos < i + q_len)[None, None]

    @nn.compact
    def __call__(self, inputs_q, inputs_kv=None, mask=None, return_weights=False):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, "
                             f"got {self.implementation!r}")
        if self.decode and inputs_kv is not None:
            raise ValueError("decode=True caches self-attention only; cross-attention keys "
                             "come from a fixed context and need no cache")
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        def proj(name, x):
            return nn.DenseGeneral(
                (self.num_heads, head_dim), dtype=self.dtype, name=name,
                kernel_init=dense_init(("embed", "heads", "kv")),
                bias_init=zeros(("heads", "kv")))(x)

        q, k, v = proj("query", inputs_q), proj("key", inputs_kv), proj("value", inputs_kv)
        if self.decode:
            k, v, mask = self._update_cache(k, v, mask)
        weights = None
        if return_weights:
            weights = attention_weights(q, k, mask)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
        elif _use_heads_major(self.implementation):
            out = heads_major_attention(q, k, v, mask)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                               implementation=self.implementation)
        out = nn.DenseGeneral(
            width, axis=(-2, -1), dtype=self.dtype, name="out",
            kernel_init=dense_init(("heads", "kv", "embed")),
            bias_init=zeros(("embed",)))(out)
        return (out, weights) if return_weights else out
