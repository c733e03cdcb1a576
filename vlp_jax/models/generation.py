"""What the generative models (GIT, SimVLM's encoder-decoder, CoCa) share: the teacher-forcing
outputs their objectives read, and their predict functions (cached generation, caption
likelihood) built from two model methods.

A generative model is a Flax module with a `decode` attribute and

    __call__(images, tokens, ...) -> dict(lm_logits [B, Ld, V], lm_targets int32 [B, Ld],
                                          lm_weights float32 [B, Ld], ...)
        teacher forcing: lm_logits[:, t] predicts lm_targets[:, t]; lm_weights marks the
        positions that count (real tokens of the caption's predicted part);
    prefill(images[, prompt]) -> context pytree of [B, ...] arrays
        (decode=True clone) everything computed once per image: it may write the image
        tokens into the self-attention cache (GIT) or return the cross-attention memory
        (encoder-decoder, CoCa);
    step(context, tokens int32 [B, 1]) -> logits [B, 1, V]
        (decode=True clone) one decoding step: feeds the next token (bos first).

`generate_fn` binds those to `vlp_jax.nn.decoding` (greedy / sampling / beam search in one
jitted loop over the key/value cache), `prompted_generate_fn` likewise with a task prompt
read by the prefill (VL-T5, encoder-decoder); `score_fn` is the mean log-likelihood of a
caption, the `score_pairs` of the evaluators (zero-shot by likelihood, re-ranking, compositional swaps).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.nn import decoding

DECODE_MODES = ("greedy", "beam", "sample")


def shifted_lm_outputs(logits: jax.Array, tokens: jax.Array, pad_id: int) -> dict:
    """Teacher-forcing outputs of a causal decoder over `tokens` [B, L] (`bos w1 .. eos pad`):
    logits [B, L, V] at position t predict token t + 1. Returns dict(lm_logits [B, L-1, V],
    lm_targets [B, L-1], lm_weights float32 [B, L-1] = target is not pad)."""
    targets = tokens[:, 1:].astype(jnp.int32)
    return dict(lm_logits=logits[:, :-1], lm_targets=targets,
                lm_weights=(targets != pad_id).astype(jnp.float32))


def sequence_log_likelihood(outputs: dict) -> tuple[jax.Array, jax.Array]:
    """(sum_t w_t log p(y_t), sum_t w_t), each float32 [B], from teacher-forcing outputs."""
    logp = jax.nn.log_softmax(outputs["lm_logits"].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, outputs["lm_targets"][..., None], axis=-1)[..., 0]
    w = outputs["lm_weights"].astype(jnp.float32)
    return jnp.sum(picked * w, axis=-1), jnp.sum(w, axis=-1)


def score_fn(model: nn.Module) -> Callable[..., jax.Array]:
    """score_pairs(params, images [B, S, S, 3], tokens [B, L]) -> float32 [B]: the mean
    per-token log-likelihood of each caption given its image (length-normalised, so prompts
    of different lengths compare)."""
    def score_pairs(params, images, tokens):
        total, count = sequence_log_likelihood(model.apply({"params": params}, images, tokens))
        return total / jnp.maximum(count, 1.0)
    return score_pairs


def never_generated(logits: jax.Array, vocab: dict) -> jax.Array:
    """logits [..., V] with pad and bos at -inf: generation emits neither (pad is never a
    trained target, bos only starts a row)."""
    ids = jnp.asarray([vocab["pad_id"], vocab["bos_id"]])
    return logits.at[..., ids].set(-jnp.inf)


def _cache_shapes(dec: nn.Module, images, bos, inputs: dict) -> Any:
    """The Flax 'cache' collection's shapes for this batch (prefill + one step, abstractly)."""
    def both(m, x, t):
        return m.step(m.prefill(x, **inputs), t)
    shapes = jax.eval_shape(lambda: dec.init(jax.random.key(0), images, bos, method=both))
    return shapes["cache"]


def decoding_state(model: nn.Module, params, images, bos, vocab: dict, **inputs
                   ) -> tuple[dict, Callable]:
    """(state, step) for `vlp_jax.nn.decoding`: state = {'cache': Flax cache after the prefill,
    'context': the prefill's per-row context}; step(state, tokens [N, 1]) -> (logits [N, V]
    float32 with pad / bos excluded, state). `inputs` go to the prefill (e.g. prompt [N, Lp]
    of a prompted encoder-decoder)."""
    dec = model.clone(decode=True)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         _cache_shapes(dec, images, bos[:, None], inputs))
    context, mut = dec.apply({"params": params, "cache": cache}, images, **inputs,
                             method="prefill", mutable=["cache"])

    def step(state, tokens):
        logits, mut = dec.apply({"params": params, "cache": state["cache"]}, state["context"],
                                tokens, method="step", mutable=["cache"])
        logits = never_generated(logits[:, -1].astype(jnp.float32), vocab)
        return logits, dict(state, cache=mut["cache"])
    return {"cache": mut["cache"], "context": context}, step


def _decoder(model: nn.Module, vocab: dict, max_length: int, mode: str, beam_size: int,
             length_penalty: float, temperature: float, top_k: int, seed: int
             ) -> Callable[..., jax.Array]:
    """decode(params, images [B, S, S, 3], **prefill inputs) -> int32 [B, max_length]: the
    decoding loop of `mode` from bos over the state `decoding_state` prefills."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decoding mode must be one of {DECODE_MODES}, got {mode!r}")
    bos_id, eos_id, pad_id = vocab["bos_id"], vocab["eos_id"], vocab["pad_id"]
    axis = decoding.scanned_batch_axis

    def decode(params, images, **inputs):
        bos = jnp.full((images.shape[0],), bos_id, jnp.int32)
        state, step = decoding_state(model, params, images, bos, vocab, **inputs)
        if mode == "greedy":
            return decoding.greedy_decode(step, state, bos, max_length=max_length,
                                          eos_id=eos_id, pad_id=pad_id)
        if mode == "sample":
            return decoding.sample_decode(step, state, bos, jax.random.key(seed),
                                          max_length=max_length, eos_id=eos_id, pad_id=pad_id,
                                          temperature=temperature, top_k=top_k)
        tokens, _ = decoding.beam_search(step, state, bos, beam_size=beam_size,
                                         max_length=max_length, eos_id=eos_id, pad_id=pad_id,
                                         length_penalty=length_penalty, batch_axis=axis)
        return tokens
    return decode


def generate_fn(model: nn.Module, vocab: dict, max_length: int, mode: str = "greedy",
                beam_size: int = 4, length_penalty: float = 0.6, temperature: float = 1.0,
                top_k: int = 0, seed: int = 0) -> Callable[..., jax.Array]:
    """generate(params, images [B, S, S, 3]) -> int32 [B, max_length] rows `bos .. eos pad`.

    mode: 'greedy', 'beam' (beam_size, length_penalty) or 'sample' (temperature, top_k; a
    fixed key from `seed`, so evaluation is repeatable). The cache of scanned stacks has a
    leading layers axis (`decoding.scanned_batch_axis`).
    """
    decode = _decoder(model, vocab, max_length, mode, beam_size, length_penalty, temperature,
                      top_k, seed)

    def generate(params, images):
        return decode(params, images)
    return generate


def prompted_generate_fn(model: nn.Module, vocab: dict, max_length: int, mode: str = "greedy",
                         beam_size: int = 4, length_penalty: float = 0.6,
                         temperature: float = 1.0, top_k: int = 0, seed: int = 0
                         ) -> Callable[..., jax.Array]:
    """generate_prompted(params, images [B, S, S, 3], prompts int [B, Lp]) -> int32
    [B, max_length]: VL-T5's text-to-text answer to each task input (the model's prefill
    reads the prompt with the image; decoding as `generate_fn`)."""
    decode = _decoder(model, vocab, max_length, mode, beam_size, length_penalty, temperature,
                      top_k, seed)

    def generate_prompted(params, images, prompts):
        return decode(params, images, prompt=jnp.asarray(prompts, jnp.int32))
    return generate_prompted


def uncached_generate_fn(model: nn.Module, vocab: dict, max_length: int
                         ) -> Callable[..., jax.Array]:
    """Greedy generation that reruns the teacher-forcing pass over the whole prefix at every
    step (no cache): the reference of the cached path and the benchmark's baseline."""
    def generate(params, images):
        bos = jnp.full((images.shape[0],), vocab["bos_id"], jnp.int32)

        def logits_fn(tokens):
            out = model.apply({"params": params}, images, tokens)
            # lm_logits[:, t] predicts token t + 1: position t's next-token logits.
            logits = jnp.pad(out["lm_logits"].astype(jnp.float32), ((0, 0), (0, 1), (0, 0)))
            return never_generated(logits, vocab)
        return decoding.uncached_greedy_decode(logits_fn, bos, max_length=max_length,
                                               eos_id=vocab["eos_id"], pad_id=vocab["pad_id"])
    return generate
