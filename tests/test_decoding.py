"""vlp_jax.nn.decoding: cached greedy / sampling / beam search against references.

The language model is the library's own causal `TextTransformer` with its tied read-out. At
random init its logits are nearly uniform and greedy paths collapse; the token table is scaled
by 5 so that paths vary and eos ends some rows (2 of 8) while the others run to max_length.
Its pad logit is set to -inf: a decoder never emits pad mid-row, and the uncached reference
(which masks pad keys) sees the same tokens as the cache.
"""
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.models.text import TextTransformer
from vlp_jax.nn.decoding import (beam_search, default_batch_axis, gather_rows, greedy_decode,
                                 sample_decode, scanned_batch_axis, tile_rows,
                                 uncached_greedy_decode)
from vlp_jax.nn.transformer import stack_layers

PAD, BOS, EOS = 0, 1, 2
LENGTH = 10
LM_BOS = jnp.arange(3, 11, dtype=jnp.int32)           # 8 rows, a different first token each


def _lm(scan: bool) -> TextTransformer:
    return TextTransformer(vocab_size=32, width=32, depth=2, num_heads=2, mlp_dim=64,
                           context_length=LENGTH, causal=True, scan_layers=scan)


def _readout(module, tokens):
    """[N, L] tokens -> [N, L, V] tied-read-out logits, pad excluded."""
    logits = module.attend(module(tokens)[1])
    return logits.at[..., PAD].set(-jnp.inf)


@pytest.fixture(scope="module")
def lm_params():
    """Unscanned parameters of the toy LM (token table scaled by 5, see the module docstring)."""
    params = nn.meta.unbox(_lm(False).init(jax.random.key(0), LM_BOS[:, None])["params"])
    params["token_embed"]["embedding"] = params["token_embed"]["embedding"] * 5.0
    return params


def _layout(scan, params):
    return stack_layers(params) if scan else params


def _lm_step(scan):
    """step(cache, tokens [N, 1]) of the decode clone, params closed over by the caller."""
    dec = _lm(scan).clone(decode=True)

    def make(params):
        def step(cache, tokens):
            logits, mut = dec.apply({"params": params, "cache": cache}, tokens,
                                    mutable=["cache"], method=_readout)
            return logits[:, -1], mut["cache"]
        return step
    return make


def _lm_cache(scan, rows):
    return _lm(scan).clone(decode=True).init(jax.random.key(1), rows[:, None])["cache"]


@pytest.fixture(scope="module")
def reference(lm_params):
    """Uncached greedy tokens [8, LENGTH] and the full-pass log-probabilities of each row."""
    model = _lm(False)

    @jax.jit
    def run(params, bos):
        fn = lambda t: model.apply({"params": params}, t, method=_readout)  # noqa: E731
        tokens = uncached_greedy_decode(fn, bos, max_length=LENGTH, eos_id=EOS, pad_id=PAD)
        return tokens, jax.nn.log_softmax(fn(tokens), axis=-1)
    tokens, logp = run(lm_params, LM_BOS)
    return np.asarray(tokens), np.asarray(logp)


def _log_prob(tokens, logp):
    """log P of each row's generated tokens (up to and including eos) and their count n."""
    out, lengths = [], []
    for row, lp in zip(tokens, logp):
        n = int((row[1:] != PAD).sum())
        out.append(sum(lp[i, row[i + 1]] for i in range(n)))
        lengths.append(n)
    return np.array(out), np.array(lengths)


def _assert_layout(tokens, bos):
    """bos, then non-pad tokens up to the first eos (if any), then only pad."""
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(tokens[:, 0], np.asarray(bos))
    for row in tokens:
        eos = np.flatnonzero(row[1:] == EOS)
        end = eos[0] + 2 if eos.size else len(row)
        assert (row[1:end] != PAD).all() and (row[end:] == PAD).all(), row


def test_reference_is_non_trivial(reference):
    tokens, _ = reference
    _assert_layout(tokens, LM_BOS)
    has_eos = (tokens == EOS).any(axis=1)
    assert 0 < has_eos.sum() < len(tokens)                  # some rows end, others are cut
    assert len({tuple(r[1:]) for r in tokens}) == len(tokens)
    assert min(len(set(r[1:])) for r in tokens[~has_eos]) >= 2   # not one repeated token


@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_equals_uncached_greedy(lm_params, reference, scan):
    make = _lm_step(scan)
    run = jax.jit(lambda p, c, b: greedy_decode(make(p), c, b, max_length=LENGTH, eos_id=EOS,
                                                pad_id=PAD))
    tokens = run(_layout(scan, lm_params), _lm_cache(scan, LM_BOS), LM_BOS)
    np.testing.assert_array_equal(np.asarray(tokens), reference[0])


@pytest.mark.parametrize("scan", [False, True])
def test_beam_of_one_is_greedy(lm_params, reference, scan):
    make = _lm_step(scan)
    axis = scanned_batch_axis if scan else default_batch_axis
    run = jax.jit(lambda p, c, b, alpha: beam_search(
        make(p), c, b, beam_size=1, max_length=LENGTH, eos_id=EOS, pad_id=PAD,
        length_penalty=alpha, batch_axis=axis))
    want, logp = reference
    log_p, n = _log_prob(want, logp)
    for alpha in (0.0, 2.0):
        tokens, scores = run(_layout(scan, lm_params), _lm_cache(scan, LM_BOS), LM_BOS, alpha)
        np.testing.assert_array_equal(np.asarray(tokens), want)
        np.testing.assert_allclose(np.asarray(scores), log_p / ((5 + n) / 6) ** alpha,
                                   rtol=1e-5)


def test_top_k_one_sampling_is_greedy(lm_params, reference):
    make = _lm_step(False)
    run = jax.jit(lambda p, c, b, rng: sample_decode(
        make(p), c, b, rng, max_length=LENGTH, eos_id=EOS, pad_id=PAD, temperature=0.7,
        top_k=1))
    tokens = run(lm_params, _lm_cache(False, LM_BOS), LM_BOS, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(tokens), reference[0])


# --- beam search on a hand-built second-order Markov chain, against brute force -------------

V = 5                    # tokens: pad 0, bos 1, eos 2, 3, 4
MARKOV_LENGTH = 5


def _markov_step(table):
    """Next-token logits table[prev, cur] ([V, V, V]); `prev` lives in the cache (per row) and
    must follow the beams, `calls` is a 0-d leaf shared by all rows."""
    table = jnp.asarray(table, jnp.float32)

    def step(cache, tokens):
        cur = tokens[:, 0]
        return table[cache["prev"], cur], {"prev": cur, "calls": cache["calls"] + 1}
    return step


def _markov_cache(rows):
    return {"prev": jnp.full((rows,), PAD, jnp.int32), "calls": jnp.zeros((), jnp.int32)}


def _brute_force(table, bos, alpha):
    """Best eos-terminated hypothesis of every row by enumeration (float64):
    argmax over y_1..y_n (y_n = eos, no earlier eos, n <= L - 1) of log P(y) / ((5+n)/6)**alpha."""
    logp = table - np.logaddexp.reduce(table, axis=-1, keepdims=True)
    best = []
    for b in bos:
        found = (-np.inf, None)
        for n in range(1, MARKOV_LENGTH):
            for body in itertools.product([t for t in range(V) if t not in (PAD, EOS)],
                                          repeat=n - 1):
                seq = [int(b), *body, EOS]
                prev, total = PAD, 0.0
                for cur, nxt in zip(seq, seq[1:]):
                    total += logp[prev, cur, nxt]
                    prev = cur
                score = total / ((5 + n) / 6) ** alpha
                if score > found[0]:
                    found = (score, seq + [PAD] * (MARKOV_LENGTH - len(seq)))
        best.append(found)
    return np.array([s for s, _ in best]), np.array([t for _, t in best])


def _beam(table, bos, beam_size, alpha):
    run = jax.jit(lambda c, b, a: beam_search(_markov_step(table), c, b, beam_size=beam_size,
                                              max_length=MARKOV_LENGTH, eos_id=EOS, pad_id=PAD,
                                              length_penalty=a))
    bos = jnp.asarray(bos, jnp.int32)
    out = [run(_markov_cache(len(bos)), bos, a) for a in np.atleast_1d(alpha)]
    return [(np.asarray(t), np.asarray(s)) for t, s in out]


def test_wide_beam_search_finds_the_brute_force_optimum():
    table = np.asarray(jax.random.normal(jax.random.key(3), (V, V, V))) * 2.0
    table[..., PAD] = -np.inf
    bos = [BOS, 3, 4]
    alphas = (0.6, 2.0)
    found = _beam(table, bos, V ** (MARKOV_LENGTH - 1), alphas)      # exhaustive width
    lengths = set()
    for alpha, (tokens, scores) in zip(alphas, found):
        want_scores, want_tokens = _brute_force(table, bos, alpha)
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
        lengths |= {int((r != PAD).sum()) - 1 for r in want_tokens}
    # optima of several lengths, the longest among them (its `prev` came through 3 reorders)
    assert len(lengths) > 1 and MARKOV_LENGTH - 1 in lengths


def _first_order(probs):
    """[V, V] next-token probabilities -> a [V, V, V] table that ignores prev."""
    with np.errstate(divide="ignore"):
        return np.broadcast_to(np.log(probs), (V, V, V)).copy()


def test_beam_of_two_beats_greedy_on_a_trap():
    """bos -> 3 (0.598) -> eos (0.4) is greedy's 0.239; bos -> 4 (0.4) -> eos (0.9) is 0.36."""
    probs = np.full((V, V), 0.25)
    probs[:, PAD] = 0.0
    probs[BOS] = [0, .001, .001, .598, .4]
    probs[3] = [0, .001, .4, .3, .299]
    probs[4] = [0, .001, .9, .05, .049]
    table = _first_order(probs)
    [(greedy_tokens, greedy_scores)] = _beam(table, [BOS], 1, 0.0)
    [(tokens, scores)] = _beam(table, [BOS], 2, 0.0)
    np.testing.assert_array_equal(greedy_tokens[0], [BOS, 3, EOS, PAD, PAD])
    np.testing.assert_array_equal(tokens[0], [BOS, 4, EOS, PAD, PAD])
    np.testing.assert_allclose(greedy_scores, [math.log(.598 * .4)], rtol=1e-5)
    np.testing.assert_allclose(scores, [math.log(.4 * .9)], rtol=1e-5)
    want_scores, want_tokens = _brute_force(table, [BOS], 0.0)
    np.testing.assert_array_equal(tokens, want_tokens)


def test_beam_of_one_stays_greedy_under_a_length_bonus():
    """With alpha = 2, bos 3 eos (log(.49 * .99) / (7/6)^2 = -0.53) beats greedy's bos eos
    (log .5 = -0.69). A hypothesis finishes only by winning a beam slot, so with one slot the
    search ends with greedy's; two slots find the better one."""
    probs = np.full((V, V), 0.25)
    probs[:, PAD] = 0.0
    probs[BOS] = [0, .005, .5, .49, .005]
    probs[3] = [0, .004, .99, .003, .003]
    table = _first_order(probs)
    [(tokens, scores)] = _beam(table, [BOS], 1, 2.0)
    np.testing.assert_array_equal(tokens[0], [BOS, EOS, PAD, PAD, PAD])
    np.testing.assert_allclose(scores, [math.log(.5)], rtol=1e-5)
    [(tokens, scores)] = _beam(table, [BOS], 2, 2.0)
    np.testing.assert_array_equal(tokens[0], [BOS, 3, EOS, PAD, PAD])
    np.testing.assert_allclose(scores, [math.log(.49 * .99) / (7 / 6) ** 2], rtol=1e-5)


# --- sampling ------------------------------------------------------------------------------

FIXED_LOGITS = np.array([-1.0, 0.5, 1.5, 0.0, 1.0, -0.5], np.float32)
SAMPLES = 4000


def _fixed_step(cache, tokens):
    """The same logits for every row and step; the cache is unused."""
    return jnp.broadcast_to(jnp.asarray(FIXED_LOGITS), (tokens.shape[0], FIXED_LOGITS.size)), cache


@functools.partial(jax.jit, static_argnames="top_k")
def _samples(temperature, top_k=0):
    """[SAMPLES, 3] rows: bos, then two draws (eos_id 99 is never drawn: nothing stops early)."""
    return sample_decode(_fixed_step, {}, jnp.zeros((SAMPLES,), jnp.int32), jax.random.key(7),
                         max_length=3, eos_id=99, pad_id=PAD, temperature=temperature,
                         top_k=top_k)


def _within_sigmas(counts, probs, sigmas=5.0):
    """Each count within `sigmas` binomial standard deviations of SAMPLES * p."""
    expected = SAMPLES * probs
    sd = np.sqrt(SAMPLES * probs * (1 - probs))
    return bool(np.all(np.abs(counts - expected) <= sigmas * sd + 1e-9))


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_frequencies_follow_the_tempered_softmax(temperature):
    tokens = np.asarray(_samples(temperature))
    want = _softmax(FIXED_LOGITS / temperature)
    for column in (1, 2):
        counts = np.bincount(tokens[:, column], minlength=FIXED_LOGITS.size)
        assert _within_sigmas(counts, want), (counts, SAMPLES * want)
    other = _softmax(FIXED_LOGITS / (1.5 - temperature))     # the other temperature's law
    assert not _within_sigmas(np.bincount(tokens[:, 1], minlength=FIXED_LOGITS.size), other)
    # a fresh key per step: the two draws are independent, P(equal) = sum_v p_v^2
    same = float((tokens[:, 1] == tokens[:, 2]).mean())
    p_same = float((want ** 2).sum())
    assert abs(same - p_same) <= 5 * math.sqrt(p_same * (1 - p_same) / SAMPLES)


def test_top_k_sampling_draws_from_the_k_largest_only():
    tokens = np.asarray(_samples(1.0, top_k=2))
    counts = np.bincount(tokens[:, 1], minlength=FIXED_LOGITS.size)
    top2 = np.argsort(FIXED_LOGITS)[-2:]
    want = np.zeros_like(FIXED_LOGITS)
    want[top2] = _softmax(FIXED_LOGITS[top2])
    assert counts[np.setdiff1d(np.arange(FIXED_LOGITS.size), top2)].sum() == 0
    assert _within_sigmas(counts[top2], want[top2]), counts


# --- layout and cache plumbing ---------------------------------------------------------------

def _countdown_step(cache, tokens):
    """Row r emits 3 until its countdown cache['left'][r] hits 0, then eos; afterwards its logits
    favour 4 (which must be ignored: the row is finished)."""
    left = cache["left"]
    logits = jnp.where((left > 0)[:, None], jax.nn.one_hot(3, 6) * 5,
                       jnp.where((left == 0)[:, None], jax.nn.one_hot(EOS, 6) * 5,
                                 jax.nn.one_hot(4, 6) * 5))
    return logits, {"left": left - 1}


def test_rows_after_eos_are_pad():
    cache = {"left": jnp.array([0, 2, 4, 9], jnp.int32)}
    bos = jnp.full((4,), BOS, jnp.int32)
    greedy = jax.jit(lambda c, b: greedy_decode(_countdown_step, c, b, max_length=6,
                                                eos_id=EOS, pad_id=PAD))(cache, bos)
    want = [[BOS, EOS, PAD, PAD, PAD, PAD], [BOS, 3, 3, EOS, PAD, PAD],
            [BOS, 3, 3, 3, 3, EOS], [BOS, 3, 3, 3, 3, 3]]
    np.testing.assert_array_equal(np.asarray(greedy), want)
    beam, _ = jax.jit(lambda c, b: beam_search(_countdown_step, c, b, beam_size=2,
                                               max_length=6, eos_id=EOS, pad_id=PAD))(cache, bos)
    np.testing.assert_array_equal(np.asarray(beam), want)
    _assert_layout(beam, bos)


def test_decoding_stops_once_every_row_has_finished():
    """Rows ending after 1 and 3 tokens: 3 steps of max_length - 1 = 9 are run. Beam search (2
    slots) stops as soon as no live hypothesis can beat a row's finished one."""
    calls = []

    def counted(cache, tokens):
        jax.debug.callback(lambda n: calls.append(int(n)), tokens.shape[0])
        return _countdown_step(cache, tokens)
    cache = {"left": jnp.array([0, 2], jnp.int32)}
    bos = jnp.full((2,), BOS, jnp.int32)
    greedy = jax.jit(lambda c, b: greedy_decode(counted, c, b, max_length=10, eos_id=EOS,
                                                pad_id=PAD))(cache, bos)
    jax.effects_barrier()
    assert calls == [2] * 3
    np.testing.assert_array_equal(np.asarray(greedy)[:, :4], [[BOS, EOS, PAD, PAD],
                                                              [BOS, 3, 3, EOS]])
    calls.clear()
    beam, _ = jax.jit(lambda c, b: beam_search(counted, c, b, beam_size=2, max_length=10,
                                               eos_id=EOS, pad_id=PAD))(cache, bos)
    jax.effects_barrier()
    assert calls == [4] * 3
    np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))


def test_tile_and_gather_rows_on_a_scanned_like_cache():
    rows, depth, n = 3, 2, 4
    tree = {"encoder": {"blocks": {"cached_key": jnp.arange(depth * rows * 5.0).reshape(
                                        depth, rows, 5),
                                   "cache_index": jnp.array([7, 7], jnp.int32)}},
            "token_embed": {"position": jnp.int32(7)},
            "context": jnp.arange(rows * 2 * 3.0).reshape(rows, 2, 3)}
    tiled = tile_rows(tree, n, scanned_batch_axis)
    assert tiled["encoder"]["blocks"]["cached_key"].shape == (depth, rows * n, 5)
    assert tiled["encoder"]["blocks"]["cache_index"].shape == (depth,)
    assert tiled["token_embed"]["position"].shape == ()
    assert tiled["context"].shape == (rows * n, 2, 3)
    for b, j in itertools.product(range(rows), range(n)):
        np.testing.assert_array_equal(tiled["context"][b * n + j], tree["context"][b])
        np.testing.assert_array_equal(tiled["encoder"]["blocks"]["cached_key"][:, b * n + j],
                                      tree["encoder"]["blocks"]["cached_key"][:, b])
    back = gather_rows(tiled, jnp.arange(rows) * n + jnp.array([3, 0, 2]), scanned_batch_axis)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    order = jnp.array([2, 0, 0, 1])
    moved = gather_rows(tree, order, scanned_batch_axis)
    np.testing.assert_array_equal(moved["context"], tree["context"][order])
    np.testing.assert_array_equal(moved["encoder"]["blocks"]["cached_key"],
                                  tree["encoder"]["blocks"]["cached_key"][:, order])
    # default_batch_axis would take the layers axis of the 'blocks' leaves for rows
    assert tile_rows(tree, n)["encoder"]["blocks"]["cache_index"].shape == (depth * n,)
