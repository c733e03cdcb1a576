"""The compositional evaluator: a perfect scorer gets 100%, a bag-of-words scorer is at
chance on swaps that keep the words, ITC cosine and fusion `score_pairs` both work."""
import numpy as np
import pytest

from vlp_jax.evaluators.compositional import evaluate_compositional, pairwise_accuracy

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
RELATIONS = ["left of", "above"]


def _world(n=40, seed=0):
    """n scenes 'a C1 S1 REL a C2 S2' with attribute- and relation-swapped negatives."""
    rng = np.random.default_rng(seed)
    positives, negatives = [], []
    for _ in range(n):
        c1, c2 = rng.choice(COLORS, 2, replace=False)
        s1, s2 = rng.choice(SHAPES, 2, replace=False)
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        positives.append(f"a {c1} {s1} {rel} a {c2} {s2}")
        negatives.append([(f"a {c2} {s1} {rel} a {c1} {s2}", "attribute"),
                          (f"a {c2} {s2} {rel} a {c1} {s1}", "relation")])
    return positives, negatives


WORDS = sorted({w for w in " ".join(COLORS + SHAPES + RELATIONS + ["a"]).split()})
VOCAB = {w: i + 1 for i, w in enumerate(WORDS)}     # 0 = pad
LENGTH = 10


def tokenize(texts):
    out = np.zeros((len(texts), LENGTH), np.int32)
    for row, text in enumerate(texts):
        ids = [VOCAB[w] for w in text.split()]
        out[row, :len(ids)] = ids
    return out


def _images(n):
    """Image i carries its index in pixel (0, 0, 0): hand-made encoders read it back."""
    images = np.zeros((n, 2, 2, 3), np.float32)
    images[:, 0, 0, 0] = np.arange(n)
    return images


def _index(images):
    return np.asarray(images)[:, 0, 0, 0].astype(int)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def bag_of_words(tokens):
    counts = np.zeros((tokens.shape[0], len(VOCAB) + 1))
    for row, ids in enumerate(tokens):
        for t in ids[ids > 0]:
            counts[row, t] += 1
    return _unit(counts[:, 1:])


def perfect_itc_encoders(positives):
    """Text: one-hot of the caption (as an ordered word sequence); image: its caption's one-hot."""
    table = {}

    def key(ids):
        return tuple(int(t) for t in ids)

    def onehot(keys):
        for k in keys:
            table.setdefault(k, len(table))
        out = np.zeros((len(keys), 512))
        out[np.arange(len(keys)), [table[k] for k in keys]] = 1.0
        return out

    true_keys = [key(t) for t in tokenize(positives)]
    return dict(encode_image=lambda im: onehot([true_keys[i] for i in _index(im)]),
                    encode_text=lambda tok: onehot([key(t) for t in tok]))


def bow_encoders(positives):
    """A scorer that sees which words occur, not how they are bound or ordered."""
    true_bow = bag_of_words(tokenize(positives))
    return dict(encode_image=lambda im: true_bow[_index(im)], encode_text=bag_of_words)


def test_perfect_scorer_gets_everything_right():
    positives, negatives = _world()
    out = evaluate_compositional(perfect_itc_encoders(positives), _images(len(positives)),
                                 positives, negatives, tokenize, batch_size=16)
    assert out["attribute"] == out["relation"] == out["overall"] == 100.0
    assert out["all_negatives"] == 100.0
    assert out["n_attribute"] == out["n_relation"] == len(positives)
    assert out["chance"] == 50.0


def test_bag_of_words_scorer_is_at_chance_on_word_preserving_swaps():
    positives, negatives = _world()
    out = evaluate_compositional(bow_encoders(positives), _images(len(positives)), positives,
                                 negatives, tokenize, batch_size=16)
    assert out["relation"] == pytest.approx(50.0)
    assert out["attribute"] == pytest.approx(50.0)
    assert out["all_negatives"] == 0.0


def test_bag_of_words_scorer_does_see_a_swap_that_changes_words():
    positives, negatives = _world()
    changed = [[(p.replace("left of", "above") if "left of" in p else p.replace("above", "left of"),
                 "relation_word")] for p in positives]
    out = evaluate_compositional(bow_encoders(positives), _images(len(positives)), positives,
                                 changed, tokenize, batch_size=16)
    assert out["relation_word"] == 100.0


def test_fusion_score_pairs_is_used_instead_of_cosine():
    positives, negatives = _world(n=12)
    true_tokens = tokenize(positives)

    def score_pairs(images, tokens):
        return np.all(tokens == true_tokens[_index(images)], axis=-1).astype(np.float32)

    def broken(_):
        raise AssertionError("ITC encoders must not be called when score_pairs is given")
    encoders = dict(encode_image=broken, encode_text=broken, score_pairs=score_pairs)
    out = evaluate_compositional(encoders, _images(12), positives, negatives, tokenize,
                                 batch_size=5)
    assert out["overall"] == 100.0


def test_ties_count_one_half_and_accuracy_is_per_kind():
    positive = np.array([1.0, 0.0])
    negative = np.array([0.5, 0.9, 0.0, 0.0])
    out = pairwise_accuracy(positive, negative, ["a", "a", "b", "b"], np.array([0, 0, 1, 1]))
    assert out["a"] == 100.0 and out["b"] == 50.0 and out["overall"] == 75.0
    assert out["all_negatives"] == 50.0


def test_random_scorer_is_near_chance():
    positives, negatives = _world(n=200, seed=1)
    rng = np.random.default_rng(0)
    enc = dict(encode_image=lambda im: _unit(rng.normal(size=(len(im), 8))),
                   encode_text=lambda tok: _unit(rng.normal(size=(len(tok), 8))))
    out = evaluate_compositional(enc, _images(200), positives, negatives, tokenize)
    assert 40.0 < out["overall"] < 60.0


def test_images_without_negatives_are_skipped_and_none_at_all_is_an_error():
    positives, negatives = _world(n=6)
    negatives = [negs if i % 2 else [] for i, negs in enumerate(negatives)]
    out = evaluate_compositional(perfect_itc_encoders(positives), _images(6), positives,
                                 negatives, tokenize)
    assert out["n_attribute"] == 3
    with pytest.raises(ValueError, match="no hard negatives"):
        evaluate_compositional(perfect_itc_encoders(positives), _images(6), positives,
                               [[]] * 6, tokenize)



def test_registered_evaluator_reads_scenes_and_honours_use_itm(shapes_data_config):
    """`type: compositional` in config.evals: the split's scenes give the canonical caption and
    its swaps; the ITM head scores them unless use_itm=False (then ITC cosines)."""
    from vlp_jax.data.pipeline import load_eval_set
    from vlp_jax.data.shapes_builder import load_tokenizer
    from vlp_jax.evaluators.registry import run_evaluators
    tok = load_tokenizer(shapes_data_config)
    calls = {"itm": 0, "itc": 0}

    def embed(kind):
        def fn(x):
            calls[kind] += 1
            flat = np.asarray(x, np.float64).reshape(len(x), -1)
            return flat[:, :4] / (np.linalg.norm(flat[:, :4], axis=1, keepdims=True) + 1e-9)
        return fn

    def score_pairs(images, tokens):
        calls["itm"] += 1
        return np.asarray(tokens, np.float64).sum(axis=1)

    encoders = dict(encode_image=embed("itc"), encode_text=embed("itc"),
                        score_pairs=score_pairs)
    evals = {"itm": {"type": "compositional", "split": "validation", "max_examples": 32},
             "itc": {"type": "compositional", "split": "validation", "max_examples": 32,
                     "use_itm": False}}
    out = run_evaluators(evals, encoders,
                         lambda split, n: load_eval_set(shapes_data_config, split, n),
                         lambda texts: tok.encode(list(texts), shapes_data_config.text_length))
    assert calls["itm"] > 0 and calls["itc"] > 0
    for name in evals:
        assert out[f"{name}/chance"] == 50.0
        assert 0.0 <= out[f"{name}/overall"] <= 100.0
        assert sum(out[k] for k in out if k.startswith(f"{name}/n_")) > 0
