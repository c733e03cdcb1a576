"""Autoregressive decoding over a key/value cache: greedy, sampling and beam search.

The decoders are model-agnostic. A model is seen through a *step function*

    step(cache, tokens int32 [N, 1]) -> (logits float32 [N, V], new_cache)

that feeds one token per row and returns the next-token logits. `cache` is any pytree; whatever
the step needs per row (a Flax 'cache' collection of `MultiHeadAttention(decode=True)` keys and
values, a cross-attention context [N, K, W] and its mask, ...) lives in it, so that beam search
can tile it to N = B * beam_size rows (`tile_rows`) and reorder it (`gather_rows`). Which axis
of a leaf is its row axis is told by a `batch_axis(path, leaf) -> int | None` function:
`default_batch_axis` (axis 0; 0-d leaves such as Flax's `cache_index` are shared by all rows) or
`scanned_batch_axis` (caches of `nn.scan`'ned stacks, whose 'blocks' leaves lead with a layers
axis).

Output layout (that of the tokenizer's encoded rows), int32 [B, max_length]:

    bos t1 t2 ... tn eos pad pad ...        or, if no eos by max_length,   bos t1 ... t_{L-1}

`bos` int32 [B] is each row's first token; the step is called with it first, and `max_length`
counts it. Generation stops early (`lax.while_loop`) once every row has finished; a finished
row's logits are ignored (it is fed pad and emits pad). Every decoder is traceable under
`jax.jit` with max_length, beam_size and top_k static; the step function is closed over, e.g.

    jax.jit(lambda cache, bos: greedy_decode(step, cache, bos, max_length=16, eos_id=2))

`uncached_greedy_decode` is the slow reference: it reruns a causal model over the whole token
buffer at every step instead of keeping a cache.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

BatchAxis = Callable[..., "int | None"]


def _key_name(entry) -> str:
    """The name of one key-path entry (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def default_batch_axis(path, leaf) -> int | None:
    """Row axis of a cache leaf: 0 for leaves with ndim >= 1; None for 0-d leaves (shared by all
    rows, e.g. Flax's scalar `cache_index` and `TokenEmbedding`'s `position` counter)."""
    del path
    return 0 if jnp.ndim(leaf) >= 1 else None


def scanned_batch_axis(path, leaf) -> int | None:
    """Row axis of a cache leaf of an `nn.scan`'ned stack (`Encoder(scan_layers=True)`).

    Leaves under a key named 'blocks' carry a leading layers axis [depth, N, ...]: their row axis
    is 1 if ndim >= 2, and None otherwise (the per-layer `cache_index` [depth] has no row axis).
    Other leaves as `default_batch_axis`.
    """
    if any(_key_name(entry) == "blocks" for entry in path):
        return 1 if jnp.ndim(leaf) >= 2 else None
    return default_batch_axis(path, leaf)


def _map_rows(fn, tree, batch_axis: BatchAxis):
    """fn(leaf, axis) on every leaf with a row axis; leaves without one are returned as they are."""
    def one(path, leaf):
        axis = batch_axis(path, leaf)
        return leaf if axis is None else fn(leaf, axis)
    return jax.tree_util.tree_map_with_path(one, tree)


def tile_rows(tree, n: int, batch_axis: BatchAxis = default_batch_axis):
    """Repeats every row n times along its row axis: row b -> rows b*n .. b*n + n - 1
    ([.., N, ..] -> [.., N*n, ..]); leaves whose `batch_axis` is None are left as they are."""
    return _map_rows(lambda x, axis: jnp.repeat(x, n, axis=axis), tree, batch_axis)


def gather_rows(tree, indices, batch_axis: BatchAxis = default_batch_axis):
    """Row i of the result is row indices[i] of the input (indices int32 [M]:
    [.., N, ..] -> [.., M, ..]); leaves whose `batch_axis` is None are left as they are."""
    indices = jnp.asarray(indices, jnp.int32)
    return _map_rows(lambda x, axis: jnp.take(x, indices, axis=axis), tree, batch_axis)


def _check_length(max_length: int):
    if max_length < 1:
        raise ValueError(f"max_length counts bos and must be >= 1, got {max_length}")


def _first_tokens(bos, max_length: int, pad_id: int) -> jax.Array:
    """[B, max_length] buffer: bos in column 0, pad elsewhere."""
    bos = jnp.asarray(bos, jnp.int32)
    if bos.ndim != 1:
        raise ValueError(f"bos must be int [B], got shape {bos.shape}")
    return jnp.full((bos.shape[0], max_length), pad_id, jnp.int32).at[:, 0].set(bos)


def _decode_loop(next_logits, state, bos, choose, *, max_length: int, eos_id: int,
                 pad_id: int) -> jax.Array:
    """The loop shared by the one-hypothesis-per-row decoders.

    At step t = 0 .. max_length - 2 (while some row is unfinished):
        logits, state = next_logits(t, tokens, state)       logits [B, V] for position t + 1
        y = choose(logits, t)  for unfinished rows, pad for finished ones
        tokens[:, t + 1] = y;  finished |= (y == eos_id)
    """
    _check_length(max_length)
    tokens = _first_tokens(bos, max_length, pad_id)
    finished = jnp.zeros(tokens.shape[:1], bool)

    def cond(carry):
        t, _, _, finished = carry
        return (t < max_length - 1) & ~jnp.all(finished)

    def body(carry):
        t, tokens, state, finished = carry
        logits, state = next_logits(t, tokens, state)
        y = jnp.where(finished, pad_id, choose(logits.astype(jnp.float32), t)).astype(jnp.int32)
        tokens = lax.dynamic_update_slice_in_dim(tokens, y[:, None], t + 1, axis=1)
        return t + 1, tokens, state, finished | (y == eos_id)

    _, tokens, _, _ = lax.while_loop(cond, body, (jnp.int32(0), tokens, state, finished))
    return tokens


def _cached_step(step):
    """next_logits for `_decode_loop` from a step function: feeds column t of the buffer."""
    def next_logits(t, tokens, cache):
        return step(cache, lax.dynamic_slice_in_dim(tokens, t, 1, axis=1))
    return next_logits


def _argmax(logits, t):
    del t
    return jnp.argmax(logits, axis=-1)


def greedy_decode(step, cache, bos, *, max_length: int, eos_id: int, pad_id: int = 0) -> jax.Array:
    """Greedy decoding: y_{t+1} = argmax_v logits_t[v], one cached step per token.

    Args:
      step: step(cache, tokens int32 [B, 1]) -> (logits [B, V], new_cache).
      cache: the step's state for the B rows (any pytree), before bos has been fed.
      bos: int32 [B], each row's first token.
      max_length: tokens per output row, bos included (static).
      eos_id, pad_id: a row finishes on eos; pad fills it afterwards.
    Returns: int32 [B, max_length], `bos t1 ... eos pad ...` (no eos if cut at max_length).
    """
    return _decode_loop(_cached_step(step), cache, bos, _argmax, max_length=max_length,
                        eos_id=eos_id, pad_id=pad_id)


def sample_decode(step, cache, bos, rng, *, max_length: int, eos_id: int, pad_id: int = 0,
                  temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """Ancestral sampling: y_{t+1} ~ softmax(logits_t / temperature), optionally top-k truncated.

    top_k > 0 (static): only the k largest logits of a row are candidates (the others get
    probability 0), y ~ softmax(top-k logits / temperature) over them (Fan et al. 2018).
    temperature may be traced; temperature <= 0 is its limit, the argmax (greedy). Step t draws
    with key `jax.random.fold_in(rng, t)`, so one rng gives one reproducible set of rows.

    Args: as `greedy_decode`, plus rng (a `jax.random.key`), temperature, top_k.
    Returns: int32 [B, max_length], laid out as `greedy_decode`'s.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no truncation), got {top_k}")
    temperature = jnp.asarray(temperature, jnp.float32)
    inv_temperature = 1.0 / jnp.where(temperature > 0, temperature, 1.0)

    def choose(logits, t):
        key = jax.random.fold_in(rng, t)
        if top_k:
            values, ids = lax.top_k(logits, top_k)                          # [B, k]
            pick = jax.random.categorical(key, values * inv_temperature, axis=-1)
            sampled = jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
        else:
            sampled = jax.random.categorical(key, logits * inv_temperature, axis=-1)
        return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1))

    return _decode_loop(_cached_step(step), cache, bos, choose, max_length=max_length,
                        eos_id=eos_id, pad_id=pad_id)


def uncached_greedy_decode(logits_fn, bos, *, max_length: int, eos_id: int,
                           pad_id: int = 0) -> jax.Array:
    """Greedy decoding without a cache (the reference, and the benchmark's baseline).

    logits_fn(tokens int32 [B, max_length]) -> [B, max_length, V] must be causal: position t's
    logits depend only on tokens <= t. Step t reruns it over the whole buffer (bos, the tokens
    so far, pad after them) and reads position t: O(max_length) work per token instead of the
    cached step's O(1) new token.

    Returns: int32 [B, max_length], laid out as `greedy_decode`'s.
    """
    def next_logits(t, tokens, state):
        logits = lax.dynamic_index_in_dim(logits_fn(tokens), t, axis=1, keepdims=False)
        return logits, state

    return _decode_loop(next_logits, (), bos, _argmax, max_length=max_length, eos_id=eos_id,
                        pad_id=pad_id)


def _gnmt_length_penalty(length, alpha: float):
    """lp(len) = ((5 + len) / 6) ** alpha (Wu et al. 2016, GNMT, §7)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(step, cache, bos, *, beam_size: int, max_length: int, eos_id: int,
                pad_id: int = 0, length_penalty: float = 0.6,
                batch_axis: BatchAxis = default_batch_axis):
    """Beam search with GNMT's length normalisation (Wu et al. 2016, §7).

    A hypothesis y = (bos, y_1 .. y_n) has log-probability  log P(y) = sum_i log p(y_i | y_<i),
    p = softmax of the step's float32 logits, and, once it ends in eos, the score

        s(y) = log P(y) / lp(n),    lp(n) = ((5 + n) / 6) ** length_penalty

    (GNMT's length penalty lp(Y) = (5 + |Y|)^alpha / (5 + 1)^alpha, without its coverage
    penalty), n the generated tokens including eos, excluding bos.
    length_penalty = 0 ranks by log P alone; larger values favour longer hypotheses.

    Each row keeps K = beam_size live hypotheses (at the start only the first, the others are
    empty slots with log P = -inf whose logits are never read). The cache is tiled to B*K rows with `tile_rows` (hypothesis k of
    row b is cache row b*K + k). At step t = 0 .. max_length - 2, with n = t + 1:
      1. the step feeds every live hypothesis's last token; the K*V extensions of a row are
         ranked by log P and its 2K best kept (at most K of them end in eos, one per parent);
      2. an extension ending in eos and ranked among the K best is finished with score s; the
         row's best finished hypothesis is kept (fairseq's rule: a hypothesis finishes only if
         it would have won a beam slot, so beam_size = 1 is exactly greedy decoding);
      3. the K best extensions not ending in eos become the live hypotheses, and the cache rows
         are reordered to their parents with `gather_rows`;
      4. a row is done (its result frozen) once it has finished K hypotheses, or once no live
         hypothesis can still beat its best finished one: log P only decreases as a hypothesis
         grows, so  s <= max_k log P_k / max(lp(n + 1), lp(max_length - 1)).
    The loop (`lax.while_loop`) stops when every row is done or at max_length. With
    K >= V ** (max_length - 1) nothing is ever pruned and the search is exhaustive.

    Args:
      step: step(cache, tokens int32 [B*K, 1]) -> (logits [B*K, V], new_cache).
      cache: the step's state for the B rows (any pytree), before bos has been fed.
      bos: int32 [B]. beam_size (K), max_length (bos included): static ints.
      eos_id, pad_id: ids; pad fills a hypothesis after its eos.
      length_penalty: GNMT's alpha (may be traced); 0.6 by default.
      batch_axis: the row axis of each cache leaf (`scanned_batch_axis` for scanned stacks).
    Returns:
      tokens int32 [B, max_length], laid out as `greedy_decode`'s: each row's best finished
        hypothesis, or, if none finished, its most probable live one (cut at max_length, no eos);
      scores float32 [B]: its s(y) (for a live one, log P / lp(max_length - 1)).
    """
    _check_length(max_length)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    k = beam_size
    first = _first_tokens(bos, max_length, pad_id)                        # [B, L]
    b = first.shape[0]
    rows = jnp.arange(b)
    lp = lambda n: _gnmt_length_penalty(n, length_penalty)                # noqa: E731

    live_tokens = jnp.repeat(first[:, None], k, axis=1)                   # [B, K, L]
    live_logp = jnp.full((b, k), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
    state = dict(t=jnp.int32(0), live_tokens=live_tokens, live_logp=live_logp,
                 cache=tile_rows(cache, k, batch_axis),
                 best_tokens=first, best_score=jnp.full((b,), -jnp.inf, jnp.float32),
                 num_finished=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool))

    def cond(s):
        return (s["t"] < max_length - 1) & ~jnp.all(s["done"])

    def body(s):
        t, done = s["t"], s["done"]
        last = lax.dynamic_index_in_dim(s["live_tokens"], t, axis=2, keepdims=False)  # [B, K]
        logits, cache = step(s["cache"], last.reshape(b * k, 1))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        v = logp.shape[-1]
        live = s["live_logp"][:, :, None]                                 # [B, K, 1]
        ext = jnp.where(live > -jnp.inf, live + logp.reshape(b, k, v), -jnp.inf)  # no NaN from
        ext = ext.reshape(b, k * v)                                       # empty slots' logits
        ext_logp, ext_id = lax.top_k(ext, min(2 * k, k * v))              # [B, C], C <= 2K
        parent, token = ext_id // v, ext_id % v
        ext_tokens = jnp.take_along_axis(s["live_tokens"], parent[:, :, None], axis=1)
        ext_tokens = ext_tokens.at[:, :, t + 1].set(token)                # [B, C, L]
        is_eos = token == eos_id

        # 2. finished hypotheses: eos extensions that won a beam slot.
        finishes = is_eos & (jnp.arange(ext_logp.shape[1]) < k) & (ext_logp > -jnp.inf)
        fin_score = jnp.where(finishes, ext_logp / lp(t + 1), -jnp.inf)
        j = jnp.argmax(fin_score, axis=1)
        better = (fin_score[rows, j] > s["best_score"]) & ~done
        best_tokens = jnp.where(better[:, None], ext_tokens[rows, j], s["best_tokens"])
        best_score = jnp.where(better, fin_score[rows, j], s["best_score"])
        num_finished = s["num_finished"] + jnp.where(done, 0, finishes.sum(axis=1))

        # 3. live hypotheses: the K best extensions that do not end in eos.
        live_logp, pick = lax.top_k(jnp.where(is_eos, -jnp.inf, ext_logp), k)   # [B, K]
        live_tokens = jnp.take_along_axis(ext_tokens, pick[:, :, None], axis=1)
        parents = jnp.take_along_axis(parent, pick, axis=1)
        cache = gather_rows(cache, (rows[:, None] * k + parents).reshape(-1), batch_axis)

        # 4. rows that can no longer improve.
        bound = live_logp.max(axis=1) / jnp.maximum(lp(t + 2), lp(max_length - 1))
        done = done | (num_finished >= k) | (best_score >= bound)
        return dict(t=t + 1, live_tokens=live_tokens, live_logp=live_logp, cache=cache,
                    best_tokens=best_tokens, best_score=best_score, num_finished=num_finished,
                    done=done)

    s = lax.while_loop(cond, body, state)
    top = jnp.argmax(s["live_logp"], axis=1)
    found = s["best_score"] > -jnp.inf
    tokens = jnp.where(found[:, None], s["best_tokens"], s["live_tokens"][rows, top])
    scores = jnp.where(found, s["best_score"], s["live_logp"][rows, top] / lp(s["t"]))
    return tokens, scores
