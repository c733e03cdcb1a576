"""Properties of BERT / whole-word masking and the MLM losses."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.losses import mlm
from vlp_jax.losses.mlm import mask_tokens, random_ordinary_ids

# Jitted: one compilation instead of one per eager op keeps the file fast.
mlm_loss, soft_mlm_loss = jax.jit(mlm.mlm_loss), jax.jit(mlm.soft_mlm_loss)
_RNG = np.random.default_rng(0)

PAD, BOS, EOS, MASK, V = 0, 1, 2, 3, 1000
SPECIAL = (PAD, BOS, EOS, MASK)


def _captions(b=512, l=32, seed=0, min_len=3):
    """bos w1 .. wk eos pad.. with k in [min_len, l - 2]; ordinary ids in [4, V)."""
    rng = np.random.default_rng(seed)
    toks = np.zeros((b, l), np.int32)
    for i in range(b):
        k = rng.integers(min_len, l - 1)
        toks[i, 0] = BOS
        toks[i, 1:k + 1] = rng.integers(4, V, k)
        toks[i, k + 1] = EOS
    return jnp.asarray(toks)


@functools.partial(jax.jit, static_argnames="prob")
def _mask_jit(key, tokens, word_start, prob):
    return mask_tokens(key, tokens, mask_id=MASK, vocab_size=V, special_ids=SPECIAL, prob=prob,
                       word_start=word_start)


def _mask(tokens, seed=0, prob=0.15, word_start=None):
    return _mask_jit(jax.random.key(seed), tokens, word_start, prob=prob)


def test_rate_split_specials_and_consistency():
    tokens = _captions()
    inputs, targets, weights = _mask(tokens)
    chex.assert_shape((inputs, targets, weights), tokens.shape)
    assert weights.dtype == jnp.float32
    t, x, w = np.asarray(tokens), np.asarray(inputs), np.asarray(weights) > 0
    special = np.isin(t, SPECIAL)
    assert not np.any(w & special)                           # specials never chosen
    np.testing.assert_array_equal(np.asarray(targets), t)    # targets are the originals
    np.testing.assert_array_equal(x[~w], t[~w])               # unchosen tokens untouched
    assert np.all(w.any(axis=1))                              # at least one per row
    rate = w.sum() / (~special).sum()
    assert 0.14 < rate < 0.18, rate                           # 15% plus the at-least-one floor
    chosen_in, chosen_orig = x[w], t[w]
    n = w.sum()
    frac_mask = np.mean(chosen_in == MASK)
    frac_random = np.mean((chosen_in != MASK) & (chosen_in != chosen_orig))
    frac_keep = np.mean(chosen_in == chosen_orig)
    tol = 4 * np.sqrt(0.1 * 0.9 / n)
    assert abs(frac_mask - 0.8) < 4 * np.sqrt(0.16 / n), frac_mask
    assert abs(frac_random - 0.1) < tol, frac_random
    assert abs(frac_keep - 0.1) < tol, frac_keep
    assert not np.any(np.isin(chosen_in[chosen_in != MASK], SPECIAL))   # replacements ordinary


def test_rows_without_ordinary_tokens_choose_nothing():
    tokens = jnp.asarray([[BOS, EOS, PAD, PAD], [BOS, 7, EOS, PAD]], jnp.int32)
    _, _, w = _mask(tokens, prob=0.01)
    np.testing.assert_array_equal(np.asarray(w), [[0, 0, 0, 0], [0, 1, 0, 0]])


def test_random_replacements_cover_only_ordinary_ids():
    ids = np.asarray(random_ordinary_ids(jax.random.key(1), (20000,), 10, (0, 3, 9)))
    counts = np.bincount(ids, minlength=10)
    assert counts[[0, 3, 9]].sum() == 0
    ordinary = np.delete(counts, [0, 3, 9])
    expected = 20000 / 7
    assert np.sum((ordinary - expected) ** 2 / expected) < 25.0       # 6 dof


def test_whole_words_are_masked_together():
    b, l = 128, 48
    tokens = np.asarray(_captions(b, l, seed=1, min_len=l - 6))   # ~17 words a row
    rng = np.random.default_rng(2)
    starts = rng.random((b, l)) < 0.4
    inputs, _, weights = _mask(jnp.asarray(tokens), seed=3, word_start=jnp.asarray(starts))
    w = np.asarray(weights) > 0
    special = np.isin(tokens, SPECIAL)
    assert not np.any(w & special) and np.all(w.any(1))
    n_words = n_chosen = 0
    for i in range(b):
        words, current = [], []
        for j in range(l):
            if special[i, j]:
                current = []
                continue
            if starts[i, j] or not current:
                current = [j]
                words.append(current)
            else:
                current.append(j)
        for word in words:
            assert len(set(w[i, word])) == 1, (i, word, w[i])   # all pieces or none
        n_words += len(words)
        n_chosen += sum(bool(w[i, word[0]]) for word in words)
    assert 0.13 < n_chosen / n_words < 0.18, n_chosen / n_words


def test_word_start_table_per_vocabulary_id():
    table = np.zeros(V, bool)
    table[4::2] = True                        # even ids start words, odd ids continue them
    tokens = _captions(64, 16, seed=4)
    a = _mask(tokens, seed=5, word_start=jnp.asarray(table))
    b = _mask(tokens, seed=5, word_start=jnp.asarray(table)[tokens])
    chex.assert_trees_all_equal(a, b)


def _ce(logits, targets):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0], logp


def test_mlm_loss_matches_numpy_reference():
    logits = jnp.asarray(_RNG.normal(size=(3, 7, 11)) * 3, jnp.float32)
    targets = jnp.asarray(_RNG.integers(0, 11, (3, 7)), jnp.int32)
    weights = jnp.asarray(_RNG.random((3, 7)) < 0.4, jnp.float32)
    loss, metrics = mlm_loss(logits, targets, weights)
    ce, logp = _ce(logits, targets)
    w = np.asarray(weights)
    np.testing.assert_allclose(loss, (ce * w).sum() / w.sum(), rtol=1e-5)
    hits = logp.argmax(-1) == np.asarray(targets)
    np.testing.assert_allclose(metrics["mlm_acc"], (hits * w).sum() / w.sum(), rtol=1e-6)
    perfect = jnp.asarray(20.0 * np.eye(11)[np.asarray(targets)], jnp.float32)
    loss_p, metrics_p = mlm_loss(perfect, targets, weights)
    assert float(metrics_p["mlm_acc"]) == 1.0 and float(loss_p) < 1e-6
    zero_loss, zero_metrics = mlm_loss(logits, targets, jnp.zeros_like(weights))
    chex.assert_tree_all_finite((zero_loss, zero_metrics))
    assert float(zero_loss) == 0.0


def test_soft_mlm_loss_matches_reference_and_hard_targets():
    logits = jnp.asarray(_RNG.normal(size=(2, 5, 9)), jnp.float32)
    t = np.exp(_RNG.normal(size=(2, 5, 9)) * 2)
    teacher = jnp.asarray(t / t.sum(-1, keepdims=True), jnp.float32)
    weights = jnp.asarray([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], jnp.float32)
    _, logp = _ce(logits, jnp.zeros((2, 5), jnp.int32))
    soft = -(np.asarray(teacher) * logp).sum(-1)
    w = np.asarray(weights)
    np.testing.assert_allclose(soft_mlm_loss(logits, teacher, weights),
                               (soft * w).sum() / w.sum(), rtol=1e-5)
    targets = jnp.asarray(_RNG.integers(0, 9, (2, 5)), jnp.int32)
    one_hot = jnp.asarray(np.eye(9)[np.asarray(targets)], jnp.float32)
    np.testing.assert_allclose(soft_mlm_loss(logits, one_hot, weights),
                               mlm_loss(logits, targets, weights)[0], rtol=1e-5)


def _word_index_of_pieces(pieces):
    """Word number of each sentencepiece piece, from the piece strings ('\u2581' opens a word)."""
    index, out = -1, []
    for piece in pieces:
        index += piece.startswith("\u2581") or index < 0
        out.append(index)
    return out


def _mask_for_mlm():
    """The methods' BERT masking with the tokenizer's vocab (methods/vilt.py; moving to
    vlp_jax/objectives/masking.py in the objectives refactor)."""
    try:
        from vlp_jax.objectives.masking import mask_for_mlm
    except ImportError:
        from vlp_jax.methods.vilt import mask_for_mlm
    return mask_for_mlm


def test_whole_word_masking_on_real_tokenizer_output(shapes_data_config):
    """wwm through the data layer's vocab (DataBridge.vocab()['word_start']): every piece of a
    chosen word is chosen, on captions with words the tokenizer splits into many pieces."""
    from vlp_jax.train.data_bridge import DataBridge
    mask_for_mlm = _mask_for_mlm()
    bridge = DataBridge(shapes_data_config)
    vocab, tok = bridge.vocab(), bridge.tokenizer
    rng = np.random.default_rng(0)
    odd = ["quadrilateral", "trapezium", "heptagons", "rhomboid", "circles.", "left."]
    texts = [" ".join(rng.choice(odd + ["a", "red", "small", "square"], 6)) for _ in range(256)]
    tokens = np.asarray(bridge.tokenize(texts))
    length = tokens.shape[1]
    masked = jax.jit(lambda k, t, wwm: mask_for_mlm(k, t, vocab, 0.15, wwm)[2],
                     static_argnums=2)
    whole = np.asarray(masked(jax.random.key(1), jnp.asarray(tokens), True)) > 0
    single = np.asarray(masked(jax.random.key(1), jnp.asarray(tokens), False)) > 0
    chosen_multi = split_single = 0
    for i, text in enumerate(texts):
        words = _word_index_of_pieces(tok.pieces(text))[:length - 2]   # row: bos pieces.. eos
        groups = {}
        for j, word in enumerate(words):
            groups.setdefault(word, []).append(j + 1)
        for cols in groups.values():
            assert len(set(whole[i, cols])) == 1, (text, cols, whole[i])   # all or none
            if len(cols) > 1:
                chosen_multi += bool(whole[i, cols[0]])
                split_single += len(set(single[i, cols])) > 1
    assert chosen_multi > 50          # many multi-piece words were chosen whole
    assert split_single > 50          # per-token masking splits them: the check can fail


def test_whole_word_masking_without_a_table_raises():
    mask_for_mlm = _mask_for_mlm()
    vocab = dict(vocab_size=V, pad_id=PAD, bos_id=BOS, eos_id=EOS, mask_id=MASK)
    tokens = _captions(4, 8)
    with pytest.raises(ValueError, match="word_start"):
        mask_for_mlm(jax.random.key(0), tokens, vocab, 0.15, True)
    mask_for_mlm(jax.random.key(0), tokens, vocab, 0.15, False)     # per token: fine
