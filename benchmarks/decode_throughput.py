"""Decoding throughput: cached greedy vs uncached greedy vs cached beam search.

The model is the library's causal `TextTransformer` with its tied read-out at random init (pad
logit set to -inf, as a captioner never emits pad), decoding `--batch` rows of `--length`
tokens (bos included) from random bos tokens:

  cached greedy     `greedy_decode` over the decode=True clone's key/value cache: one new token
                    per step through the stack
  uncached greedy   `uncached_greedy_decode`: the full [batch, length] causal pass at every step
  cached beam       `beam_search` with `--beam` hypotheses per row (batch * beam cache rows)

Each decoder is one `jax.jit` program; a warm-up call compiles it and is not timed, then
`--repeats` calls are timed with `jax.block_until_ready`. Generated tokens are the output
tokens after bos that are not pad (the decoders stop early once every row has ended; at random
init eos is rare, so rows run to the full length); tokens/s uses the median repeat.

    python benchmarks/decode_throughput.py                       # width 128, depth 4, vocab 256
    python benchmarks/decode_throughput.py --batch 8 --length 64 --beam 8
"""
from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.models.text import TextTransformer
from vlp_jax.nn.decoding import beam_search, greedy_decode, uncached_greedy_decode

PAD, EOS = 0, 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=32, help="tokens per row, bos included")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def _readout(module, tokens):
    """[N, L] -> [N, L, V] tied-read-out logits, pad excluded."""
    return module.attend(module(tokens)[1]).at[..., PAD].set(-jnp.inf)


def build(args):
    """(model, params, decode clone's empty cache, bos [batch])."""
    model = TextTransformer(vocab_size=args.vocab, width=args.width, depth=args.depth,
                            num_heads=args.heads, mlp_dim=4 * args.width,
                            context_length=args.length, causal=True)
    bos = jax.random.randint(jax.random.key(1), (args.batch,), 3, args.vocab, jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), bos[:, None])["params"])
    cache = model.clone(decode=True).init(jax.random.key(0), bos[:, None])["cache"]
    return model, params, cache, bos


def decoders(model, args):
    """name -> jitted fn(params, cache, bos) -> tokens [batch, length]."""
    dec = model.clone(decode=True)

    def step_of(params):
        def step(cache, tokens):
            logits, mut = dec.apply({"params": params, "cache": cache}, tokens,
                                    mutable=["cache"], method=_readout)
            return logits[:, -1], mut["cache"]
        return step

    def cached(params, cache, bos):
        return greedy_decode(step_of(params), cache, bos, max_length=args.length, eos_id=EOS,
                             pad_id=PAD)

    def uncached(params, cache, bos):
        del cache
        logits_fn = lambda t: model.apply({"params": params}, t, method=_readout)  # noqa: E731
        return uncached_greedy_decode(logits_fn, bos, max_length=args.length, eos_id=EOS,
                                      pad_id=PAD)

    def beam(params, cache, bos):
        return beam_search(step_of(params), cache, bos, beam_size=args.beam,
                           max_length=args.length, eos_id=EOS, pad_id=PAD)[0]

    return {"cached greedy": jax.jit(cached), "uncached greedy": jax.jit(uncached),
            f"cached beam search (beam {args.beam})": jax.jit(beam)}


def measure(fn, inputs, repeats: int):
    """(output of the warm-up call, seconds of each timed call)."""
    out = jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - start)
    return out, times


def main(argv=None):
    args = parse_args(argv)
    model, params, cache, bos = build(args)
    print(f"# {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); width {args.width}, "
          f"depth {args.depth}, heads {args.heads}, vocab {args.vocab}, batch {args.batch}, "
          f"length {args.length}, {args.repeats} timed repeats after a warm-up call\n")
    print("| decoder | generated tokens | median ms / call | best ms / call | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rates, outputs = {}, {}
    for name, fn in decoders(model, args).items():
        out, times = measure(fn, (params, cache, bos), args.repeats)
        generated = int((np.asarray(out)[:, 1:] != PAD).sum())
        median = statistics.median(times)
        rates[name], outputs[name] = generated / median, np.asarray(out)
        print(f"| {name} | {generated} | {1e3 * median:.1f} | {1e3 * min(times):.1f} | "
              f"{rates[name]:,.0f} |")
    same = np.array_equal(outputs["cached greedy"], outputs["uncached greedy"])
    print(f"\ncached and uncached greedy tokens identical: {same}")
    ratio = rates["cached greedy"] / rates["uncached greedy"]
    print(f"cached / uncached greedy tokens/s: {ratio:.2f}")


if __name__ == "__main__":
    main()
