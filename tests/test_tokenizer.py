"""The sentencepiece tokenizer: special ids, fixed-length layout, truncation, round trips."""
import pickle

import numpy as np
import pytest

from vlp_jax.data import shapes_world
from vlp_jax.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer,
                                    train_tokenizer)


def _corpus(n=300, seed=0):
    rng = np.random.default_rng(seed)
    captions = []
    for _ in range(n):
        captions += shapes_world.describe_many(shapes_world.sample_scene(rng), rng, 5)
    prompts = [t.format(c) for c in shapes_world.CLASS_NAMES for t in shapes_world.PROMPT_TEMPLATES]
    return captions, prompts


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def model(corpus):
    captions, prompts = corpus
    return train_tokenizer(captions + prompts, vocab_size=256)


@pytest.fixture(scope="module")
def tok(model):
    return Tokenizer(model)


def test_special_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    assert tok.pad_id == 0
    specials = {tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id}
    assert len(specials) == 5 and max(specials) < tok.vocab_size <= 256
    assert tok.mask_id in tok.encode(["a [MASK] circle."], 8)[0]


def test_layout_is_bos_tokens_eos_pad(tok, corpus):
    captions = corpus[0][:200]
    ids = tok.encode(captions, 28)
    assert ids.shape == (200, 28) and ids.dtype == np.int32
    for row, text in zip(ids, captions):
        n = tok.token_count(text)
        assert n <= 28, text
        assert row[0] == BOS_ID and row[n - 1] == EOS_ID
        assert (row[n:] == PAD_ID).all() and (row[1:n - 1] > UNK_ID).all()


def test_round_trip(tok, corpus):
    captions, prompts = corpus
    texts = captions[:300] + prompts[:50]
    assert tok.decode(tok.encode(texts, 40)) == texts
    assert tok.decode(tok.encode(texts, 40)[0]) == texts[0]


def test_words_of_the_world_are_single_pieces(tok, corpus):
    words = {w for text in corpus[0] + corpus[1] for w in text.replace(".", " ").split()}
    split = sorted(w for w in words if len(tok.pieces(w)) != 1 and w.isalpha())
    assert not split, split


def test_empty_caption(tok):
    assert tok.encode([""], 6).tolist() == [[BOS_ID, EOS_ID, 0, 0, 0, 0]]
    assert tok.encode([], 6).shape == (0, 6)
    assert tok.decode(tok.encode([""], 6)[0]) == ""


def test_over_long_caption_is_truncated_with_eos(tok):
    text = " ".join(["a large red circle to the left of a small blue square"] * 5)
    full = [BOS_ID] + tok._sp.encode(text) + [EOS_ID]
    assert len(full) > 12
    ids = tok.encode([text], 12)[0]
    assert ids.tolist() == full[:11] + [EOS_ID]
    assert tok.decode(ids) == "a large red circle to the left of a small"


def test_case_is_folded(tok):
    np.testing.assert_array_equal(tok.encode(["A Large RED circle."], 12),
                                  tok.encode(["a large red circle."], 12))


def test_bad_arguments_raise(tok):
    with pytest.raises(ValueError, match="length"):
        tok.encode(["a"], 1)
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode("a red circle", 8)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], 4)
    with pytest.raises(ValueError, match="non-empty"):
        train_tokenizer(["", " "], 64)


def test_training_is_deterministic_and_loads_from_path_and_pickle(model, tok, corpus, tmp_path):
    captions, prompts = corpus
    assert train_tokenizer(captions + prompts, vocab_size=256) == model
    path = tmp_path / "spm.model"
    path.write_bytes(model)
    texts = captions[:20]
    for other in (Tokenizer(str(path)), Tokenizer.from_path(path), pickle.loads(pickle.dumps(tok))):
        np.testing.assert_array_equal(other.encode(texts, 28), tok.encode(texts, 28))
        assert other.mask_id == tok.mask_id and other.vocab_size == tok.vocab_size


def test_word_start_table_marks_word_initial_pieces(tok):
    table = tok.word_start
    assert table.shape == (tok.vocab_size,) and table.dtype == bool
    pieces = [tok._sp.id_to_piece(i) for i in range(tok.vocab_size)]
    for i, piece in enumerate(pieces):
        special = i in (PAD_ID, BOS_ID, EOS_ID, tok.mask_id)
        assert table[i] == (special or piece.startswith("\u2581")), (i, piece)
    assert not table[UNK_ID]          # an unseen character continues its word
    assert (~table).sum() > 50        # many continuation pieces on this corpus (172 of 256)
    # Each word of a text opens with exactly one word-start piece.
    text = "a quadrilateral trapezium left of circles."   # 'z' is unseen: unk
    ids = tok.encode([text], 40)[0]
    body = ids[1:tok.token_count(text) - 1]
    assert table[body].sum() == len(text.split()) and table[body[0]]
    tok.word_start[:] = False         # the property hands out a copy
    assert tok.word_start.sum() == table.sum()
