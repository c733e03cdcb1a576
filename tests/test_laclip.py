"""LaCLIP: per-step caption sampling, the JSON-lines rewrite source, and learning."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.data.pipeline import make_train_iterator
from vlp_jax.data.rewrites import (candidate_tokens, load_rewrites, parse_rewrites,
                                   write_rewrites)
from vlp_jax.data.shapes_builder import load_tokenizer
from vlp_jax.methods.contrastive import ContrastiveMethod
from vlp_jax.methods.laclip import sample_captions
from vlp_jax.methods.registry import build_method
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.train.metrics_log import read_metrics
from vlp_jax.train.trainer import train_and_evaluate
from tests.helpers import tiny_experiment_config

VOCAB = dict(vocab_size=50, pad_id=0, bos_id=1, eos_id=2, mask_id=3)


def _candidates(b=6, k=4, length=6, present=None, seed=0):
    """Row j of example i starts with bos, then token 10 * (j + 1) + i (so rows are tellable)."""
    present = np.ones((b, k), bool) if present is None else np.asarray(present)
    c = np.zeros((b, k, length), np.int32)
    for i in range(b):
        for j in range(k):
            if present[i, j]:
                c[i, j, :3] = (1, 10 * (j + 1) + i, 2)
    return jnp.asarray(c)


def test_sampling_draws_only_present_candidates_uniformly():
    present = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]], bool)
    cands = _candidates(b=4, present=present)
    fallback = jnp.full((4, 6), 7, jnp.int32)
    draws = jax.jit(jax.vmap(lambda k: sample_captions(k, cands, fallback, 0)[1]))(
        jax.random.split(jax.random.key(0), 4000))
    draws = np.asarray(draws)                                        # [4000, 4]
    for i in range(4):
        counts = np.bincount(draws[:, i], minlength=4) / len(draws)
        expected = present[i] / present[i].sum()
        np.testing.assert_allclose(counts, expected, atol=0.03)     # ~7 sigma at n = 4000
    tokens, idx = sample_captions(jax.random.key(1), cands, fallback, 0)
    np.testing.assert_array_equal(
        np.asarray(tokens), np.asarray(cands)[np.arange(4), np.asarray(idx)])


def test_sampling_falls_back_without_candidates_and_first_mode_is_deterministic():
    present = np.array([[0, 0, 0, 0], [0, 1, 1, 0]], bool)
    cands = _candidates(b=2, present=present)
    fallback = jnp.full((2, 6), 7, jnp.int32)
    tokens, idx = sample_captions(jax.random.key(3), cands, fallback, 0)
    assert int(idx[0]) == -1 and (np.asarray(tokens[0]) == 7).all()
    for seed in range(5):
        _, first = sample_captions(jax.random.key(seed), cands, fallback, 0, "first")
        assert first.tolist() == [-1, 1]
    with pytest.raises(ValueError, match="sampling"):
        sample_captions(jax.random.key(0), cands, fallback, 0, "longest")


def test_sampling_changes_with_the_step_key():
    cands = _candidates(b=32)
    fallback = jnp.zeros((32, 6), jnp.int32)
    a = sample_captions(jax.random.key(0), cands, fallback, 0)[1]
    b = sample_captions(jax.random.key(1), cands, fallback, 0)[1]
    assert (a == sample_captions(jax.random.key(0), cands, fallback, 0)[1]).all()
    assert (a != b).any()


def _method(**method):
    model = ml_collections.ConfigDict(dict(
        name="dual_encoder", embed_dim=16,
        image=dict(type="vit", patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32,
                   image_size=16),
        text=dict(width=16, depth=1, num_heads=2, mlp_dim=32, context_length=6)))
    cfg = ml_collections.ConfigDict(dict(model=model, method=dict(name="laclip", **method)))
    return build_method(cfg, VOCAB, make_mesh())


def test_value_and_grad_draws_once_and_matches_clip_on_the_drawn_text():
    method = _method()
    b = 8
    cands = _candidates(b=b)
    batch = dict(image=jax.random.uniform(jax.random.key(0), (b, 16, 16, 3)), captions=cands,
                 text=cands[:, 0])
    params = jax.jit(lambda k: nn.meta.unbox(method.init_params(k, batch)))(jax.random.key(0))
    rng = jax.random.key(5)
    (loss, (metrics, _)), _ = jax.jit(method.value_and_grad)(params, {}, batch, rng, 0)
    drawn = method.prepare_batch(batch, method.prepare_key(rng))
    assert "captions" not in drawn and drawn["caption_index"].shape == (b,)
    assert (np.asarray(drawn["text"]) != np.asarray(batch["text"])).any()   # texts were drawn
    clip_loss = jax.jit(lambda p, d: ContrastiveMethod.loss(method, p, {}, d, rng, 0)[0])(
        params, drawn)
    np.testing.assert_allclose(loss, clip_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["laclip/caption_index_mean"],
                               np.mean(np.asarray(drawn["caption_index"])), rtol=1e-6)
    with pytest.raises(ValueError, match="all_captions"):
        method.prepare_batch({"image": batch["image"], "text": batch["text"]}, rng)
    with pytest.raises(ValueError, match="prepared"):
        method.loss(params, {}, batch, rng, 0)


# ----------------------------------------------------------------------------- rewrites

def test_rewrites_merge_by_caption_and_by_index(tmp_path):
    path = tmp_path / "rewrites.jsonl"
    write_rewrites(str(path), [
        {"caption": "A red  circle", "rewrites": ["a circle that is red", "red round shape"]},
        {"index": 4, "rewrites": ["one red disc"]},
        {"caption": "a blue square", "rewrites": ["a square, blue"]},
    ])
    table = load_rewrites(str(path))
    assert len(table) == 4
    got = table.candidates(["a red circle", "the red circle"], index=4)
    assert got == ["a red circle", "the red circle", "a circle that is red", "red round shape",
                   "one red disc"]
    assert table.candidates(["a green star"], index=0) == ["a green star"]
    dup = table.candidates(["a red circle", "A RED CIRCLE"])          # duplicates dropped
    assert dup == ["a red circle", "a circle that is red", "red round shape"]
    assert table.candidates(["a red circle"], max_candidates=2) == ["a red circle",
                                                                    "a circle that is red"]


def test_candidate_tokens_pad_missing_rows():
    def tokenize(texts):
        return np.array([[1, len(t), 2, 0] for t in texts], np.int32)
    block = candidate_tokens(["ab", "abc"], tokenize, num_candidates=4, length=4)
    assert block.shape == (4, 4) and block.dtype == np.int32
    np.testing.assert_array_equal(block[:2, 1], [2, 3])
    assert (block[2:] == 0).all()
    assert candidate_tokens(list("abcdef"), tokenize, 3, 4).shape == (3, 4)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a"]', "JSON object"),
    ('{"rewrites": ["x"]}', "exactly one"),
    ('{"caption": "a", "index": 1, "rewrites": []}', "exactly one"),
    ('{"caption": "a", "rewrites": "x"}', "list of strings"),
    ('{"index": "3", "rewrites": ["x"]}', "integer"),
])
def test_malformed_rewrite_lines_name_the_line(line, message):
    lines = [json.dumps({"caption": "ok", "rewrites": ["fine"]}), "", line]
    with pytest.raises(ValueError, match=rf"r\.jsonl:3: .*{message}"):
        parse_rewrites(lines, source="r.jsonl")


def test_rewrite_file_reaches_the_training_candidates(shapes_data_config, tmp_path):
    path = tmp_path / "rewrites.jsonl"
    write_rewrites(str(path), [{"index": i, "rewrites": [f"rewrite number {i % 7} of a scene"]}
                               for i in range(shapes_data_config.num_train)])
    shapes_data_config.update(dict(all_captions=True, rewrites_path=str(path)))
    batch = next(make_train_iterator(shapes_data_config, global_batch_size=8, seed=0))
    cands = batch["captions"]
    assert cands.shape == (8, 2 * shapes_data_config.captions_per_image,
                           shapes_data_config.text_length)
    count = (cands[:, :, 0] != 0).sum(1)           # captions (deduplicated), then the rewrite
    assert (count >= 2).all() and (count <= shapes_data_config.captions_per_image + 1).all()
    tokenizer = load_tokenizer(shapes_data_config)
    for row, n in zip(cands, count):
        assert tokenizer.decode(row[n - 1]).startswith("rewrite number"), tokenizer.decode(row)
        assert not any(t.startswith("rewrite") for t in tokenizer.decode(row[:n - 1]))


@pytest.mark.slow
def test_laclip_learns_far_above_chance(shapes_data_config, tmp_path):
    config = tiny_experiment_config(shapes_data_config, "laclip_shapes.py:smoke", 150)
    assert config.data.all_captions and config.method.sampling == "uniform"
    result = train_and_evaluate(config, str(tmp_path), progress=False)
    rows = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    ev = result["eval"]
    print("LaCLIP eval", ev, "train", result["train"])
    assert result["train"]["laclip/caption_index_mean"] > 0.2           # not always the first caption
    assert ev["zeroshot/top1"] > 3 * ev["zeroshot/chance"], ev
    assert ev["retrieval/t2i_r10"] > 3 * 10 / 128 * 100, ev
