"""Evaluators: retrieval recall@k (COCO rules, pessimistic ties, chunking), zero-shot top-k
with prompt ensembling, batched embedding (one compile), and the `type` registry."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.data.types import EvalSet
from vlp_jax.evaluators import (EVALUATORS, class_embeddings, embed_in_batches,
                                recall_from_scores, retrieval_metrics, run_evaluators,
                                zero_shot_accuracy)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_recall(scores, owner, ks):
    """Sort-based COCO recall (valid without ties): best rank of any own caption / own image."""
    n, m = scores.shape
    out = {}
    order_i2t = np.argsort(-scores, axis=1)                      # [N, M] captions best first
    i2t = np.array([np.min(np.nonzero(owner[order_i2t[i]] == i)[0]) for i in range(n)])
    order_t2i = np.argsort(-scores, axis=0)                      # [N, M] images best first
    t2i = np.array([np.nonzero(order_t2i[:, j] == owner[j])[0][0] for j in range(m)])
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * np.mean(i2t < k)
        out[f"t2i_r{k}"] = 100.0 * np.mean(t2i < k)
    return out


# ---------------------------------------------------------------------------- retrieval

def test_identity_embeddings_are_perfect_at_every_k():
    emb = np.eye(7, dtype=np.float32)
    out = retrieval_metrics(emb, emb * 3.0, np.arange(7))       # scale: normalised inside
    assert set(out) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    assert all(v == 100.0 for v in out.values())


def test_true_match_ranked_exactly_third():
    """Text m = a e_{m+1} + b e_{m+2} + c e_m (a > b > c > 0): its image comes 3rd in t2i,
    and each image's caption comes 3rd among the captions in i2t."""
    n = 8
    images = np.eye(n, dtype=np.float32)
    texts = np.zeros((n, n), np.float32)
    for m in range(n):
        texts[m, (m + 1) % n], texts[m, (m + 2) % n], texts[m, m] = 0.8, 0.5, 0.3
    out = retrieval_metrics(images, texts, np.arange(n), ks=(1, 2, 3, 5))
    for d in ("i2t", "t2i"):
        assert out[f"{d}_r1"] == out[f"{d}_r2"] == 0.0
        assert out[f"{d}_r3"] == out[f"{d}_r5"] == 100.0


def test_coco_multi_caption_image_is_a_hit_if_any_caption_ranks_first():
    """5 captions per image; only caption 0 of each image points at it, the other 4 point
    at the next image. i2t@1 is perfect; t2i@1 only for the 1 good caption in 5."""
    n, per = 6, 5
    images = np.eye(n, dtype=np.float32)
    owner = np.repeat(np.arange(n), per)
    texts = np.zeros((n * per, n), np.float32)
    for j, i in enumerate(owner):
        if j % per == 0:
            texts[j, i] = 1.0
        else:
            texts[j, i], texts[j, (i + 1) % n] = 0.4, 0.9
    out = retrieval_metrics(images, texts, owner, ks=(1, 2))
    assert out["i2t_r1"] == 100.0
    assert out["t2i_r1"] == pytest.approx(100.0 / per)
    assert out["t2i_r2"] == 100.0


def test_ties_count_against_the_model():
    # a collapsed model: every score equal -> nothing is retrieved at k < number of candidates
    out = retrieval_metrics(np.ones((4, 3)), np.ones((4, 3)), np.arange(4), ks=(1, 3, 4))
    assert out["i2t_r1"] == out["t2i_r1"] == 0.0 and out["i2t_r3"] == out["t2i_r3"] == 0.0
    assert out["i2t_r4"] == out["t2i_r4"] == 100.0     # k = all candidates
    # one tie with a wrong candidate: image 0 vs captions 0 (own) and 1 are both 1.0
    scores = np.array([[1.0, 1.0, 0.0],
                       [0.0, 2.0, 0.0],
                       [0.0, 0.0, 1.0]])
    out = recall_from_scores(scores, np.arange(3), ks=(1, 2))
    assert out["i2t_r1"] == pytest.approx(200.0 / 3) and out["i2t_r2"] == 100.0
    assert out["t2i_r1"] == 100.0   # caption 0: image 0 (1.0) beats the others (0.0)
    # ties among an image's OWN captions do not count against it
    out = recall_from_scores(np.array([[1.0, 1.0, 0.5], [0.0, 0.0, 1.0]]),
                             np.array([0, 0, 1]), ks=(1,))
    assert out["i2t_r1"] == 100.0


def test_nan_scores_are_misses():
    scores = np.array([[np.nan, 0.0], [0.0, 1.0]])
    out = recall_from_scores(scores, np.arange(2), ks=(1,))
    assert out["i2t_r1"] == 50.0 and out["t2i_r1"] == 50.0


def test_random_embeddings_match_a_sort_based_reference():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(23, 16)), rng.normal(size=(57, 16))
    owner = np.concatenate([np.arange(23), rng.integers(0, 23, size=34)])
    ks = (1, 3, 5, 10)
    ref = _reference_recall(_unit(img) @ _unit(txt).T, owner, ks)
    out = retrieval_metrics(img, txt, owner, ks=ks)
    for key in ref:
        assert out[key] == pytest.approx(ref[key]), key


def test_chunked_equals_unchunked_and_scores_path_agrees():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(31, 8)), rng.normal(size=(90, 8))
    owner = np.repeat(np.arange(30), 3)      # image 30 has no caption: left out of i2t
    whole = retrieval_metrics(img, txt, owner, chunk_size=10_000)
    for chunk in (1, 7, 31):
        assert retrieval_metrics(img, txt, owner, chunk_size=chunk) == whole
    scores = _unit(img).astype(np.float32) @ _unit(txt).astype(np.float32).T
    for chunk in (4, 10_000):
        from_scores = recall_from_scores(scores, owner, chunk_size=chunk)
        assert from_scores.keys() == whole.keys()
        for key in whole:
            assert from_scores[key] == pytest.approx(whole[key]), key
    ref = _reference_recall(scores[:30], owner, (1, 5, 10))
    for key in ref:
        assert whole[key] == pytest.approx(ref[key]), key


def test_retrieval_rejects_bad_inputs():
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(np.eye(3), np.eye(3), np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="text_to_image"):
        recall_from_scores(np.eye(3), np.arange(2))


# ---------------------------------------------------------------------------- zero-shot

def test_prototype_images_are_classified_perfectly_and_chance_is_reported():
    protos = _unit(np.random.default_rng(0).normal(size=(6, 12)))
    labels = np.array([0, 1, 2, 3, 4, 5, 5, 2])
    out = zero_shot_accuracy(protos[labels] * 2.5, protos, labels)
    assert out == {"top1": 100.0, "top5": 100.0, "chance": pytest.approx(100.0 / 6)}


def test_permuted_labels_give_the_expected_accuracy():
    c = 10
    protos = np.eye(c, dtype=np.float32)
    true = np.arange(40) % c
    labels = true.copy()
    labels[:12] = (labels[:12] + 1) % c          # 12 of 40 mislabelled
    out = zero_shot_accuracy(protos[true], protos, labels, ks=(1, 5))
    assert out["top1"] == pytest.approx(100.0 * 28 / 40)
    # the wrong label ties with 8 other zero-score classes: pessimistic rank 9, not in top 5
    assert out["top5"] == pytest.approx(100.0 * 28 / 40)
    soft = protos[true] + 0.5 * protos[(true + 1) % c]      # the "wrong" label comes 2nd
    assert zero_shot_accuracy(soft, protos, labels, ks=(2,))["top2"] == 100.0


def test_prompt_ensembling_averages_normalised_prompt_embeddings():
    rng = np.random.default_rng(0)
    names, templates = ["cat", "dog", "red circle"], ["a {}.", "a photo of a {}", "{}!"]
    prompts = [t.format(n) for n in names for t in templates]
    vocab = {p: i for i, p in enumerate(prompts)}
    # prompt embeddings with very different norms, so normalise-then-average matters
    table = rng.normal(size=(len(prompts), 5)) * rng.uniform(0.1, 10.0, size=(len(prompts), 1))

    def tokenize(texts):
        return np.array([[vocab[t], 7] for t in texts], np.int32)

    encode = jax.jit(lambda tok: jnp.asarray(table, jnp.float32)[tok[:, 0]])
    got = class_embeddings(encode, tokenize, names, templates, batch_size=4)
    per_prompt = _unit(table).reshape(3, 3, 5)
    expected = _unit(per_prompt.mean(axis=1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, _unit(table.reshape(3, 3, 5).mean(axis=1)), atol=1e-3)
    with pytest.raises(ValueError, match="has no"):
        class_embeddings(encode, tokenize, names, ["no slot"], batch_size=4)


# ---------------------------------------------------------------------------- batching

def test_embed_in_batches_matches_a_direct_call_and_compiles_once():
    traces = []

    def f(x):
        traces.append(x.shape)                   # Python side effect: runs only when traced
        return jnp.tanh(x @ jnp.ones((3, 4)) * 0.1) + jnp.sum(x, axis=-1, keepdims=True)

    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    out = embed_in_batches(jax.jit(f), x, batch_size=4)     # 4 + 4 + 2 (padded to 4)
    assert out.dtype == np.float32 and out.shape == (10, 4)
    assert traces == [(4, 3)]
    np.testing.assert_allclose(out, np.asarray(f(jnp.asarray(x))), rtol=1e-5, atol=1e-6)
    assert embed_in_batches(jax.jit(f), x[:3], batch_size=16).shape == (3, 4)


# ---------------------------------------------------------------------------- registry

N_IMAGES, CAPTIONS_PER_IMAGE, DIM = 9, 3, 16
CLASSES = ["red circle", "blue square", "green triangle"]


def _eval_set(n):
    """Image i has its index in pixel (0, 0, 0), label i % 3 and captions 'i-0', 'i-1', ..."""
    images = np.zeros((n, 4, 4, 3), np.float32)
    images[:, 0, 0, 0] = np.arange(n)
    return EvalSet(images=images,
                   captions=[[f"{i}-{j}" for j in range(CAPTIONS_PER_IMAGE)] for i in range(n)],
                   labels=np.arange(n, dtype=np.int32) % 3, class_names=CLASSES,
                   prompt_templates=["a {}", "the {}"])


def _tokenize(texts):
    """'i-j' -> [100 + i, j]; a prompt -> [class id, template id]."""
    out = []
    for t in texts:
        if "-" in t:
            i, j = t.split("-")
            out.append([100 + int(i), int(j)])
        else:
            out.append([next(c for c, name in enumerate(CLASSES) if name in t),
                        int(t.startswith("the"))])
    return np.asarray(out, np.int32)


def _fake_encoders(calls):
    """Image i -> e_i + e_{12 + label}; caption of image i -> e_i, except captions 0-1 and
    0-2, which point at image 1; a prompt of class c (either template) -> e_{12 + c}."""
    basis = np.eye(DIM, dtype=np.float32)

    def encode_image(images):
        calls.append(("image", images.shape))
        idx = np.asarray(images)[:, 0, 0, 0].astype(int)
        return basis[idx] + basis[12 + idx % 3]

    def encode_text(tokens):
        calls.append(("text", tokens.shape))
        tokens = np.asarray(tokens)
        out = np.zeros((len(tokens), DIM), np.float32)
        for row, (a, b) in enumerate(tokens):
            if a >= 100:
                i = a - 100
                out[row, 1 if (i == 0 and b >= 1) else i] = 1.0
            else:
                out[row, 12 + a] = 1.0
        return out

    return dict(encode_image=encode_image, encode_text=encode_text)


def test_run_evaluators_returns_prefixed_metrics_from_the_configured_split():
    loads, calls = [], []

    def load(split, max_examples):
        loads.append((split, max_examples))
        return _eval_set(max_examples or N_IMAGES)

    evals = ml_collections.ConfigDict(dict(
        zeroshot_val=dict(type="zero_shot", split="validation", max_examples=6, batch_size=4),
        retrieval_val=dict(type="retrieval", split="test", max_examples=None, batch_size=5),
    ))
    out = run_evaluators(evals, _fake_encoders(calls), load, _tokenize)
    assert sorted(loads) == [("test", None), ("validation", 6)]
    assert {shape[0] for _, shape in calls} == {4, 5}      # always full, padded batches
    assert set(out) == {"zeroshot_val/top1", "zeroshot_val/top5", "zeroshot_val/chance",
                        *(f"retrieval_val/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))}
    assert all(isinstance(v, float) for v in out.values())
    assert out["zeroshot_val/top1"] == 100.0
    assert out["zeroshot_val/chance"] == pytest.approx(100 / 3)
    # captions 0-1, 0-2 score image 1 first and image 0 tied with 7 others at 0: pessimistic
    # rank 8, a miss below k = 9. Image 1 ties its own captions with 0-1, 0-2: rank 2.
    assert out["retrieval_val/i2t_r1"] == pytest.approx(100.0 * 8 / 9)
    assert out["retrieval_val/i2t_r5"] == 100.0
    assert out["retrieval_val/t2i_r1"] == out["retrieval_val/t2i_r5"] == pytest.approx(
        100.0 * 25 / 27)
    assert out["retrieval_val/t2i_r10"] == 100.0
    ds = _eval_set(N_IMAGES)
    texts, owner = ds.flat_captions()
    enc = _fake_encoders([])
    direct = retrieval_metrics(enc["encode_image"](ds.images),
                               enc["encode_text"](_tokenize(texts)), owner)
    assert {k: out[f"retrieval_val/{k}"] for k in direct} == pytest.approx(direct)


def test_unknown_type_names_the_evaluator_and_the_valid_types_before_running_anything():
    ran = []
    evals = ml_collections.ConfigDict(dict(
        ok=dict(type="retrieval", split="test", max_examples=None, batch_size=4),
        typo=dict(type="zeroshot", split="test", max_examples=None, batch_size=4)))
    with pytest.raises(ValueError) as err:
        run_evaluators(evals, _fake_encoders([]), lambda *a: ran.append(a), _tokenize)
    message = str(err.value)
    assert "'typo'" in message and "'zeroshot'" in message
    assert all(repr(t) in message for t in EVALUATORS) and not ran


def test_predictor_jits_once_with_params_as_an_argument_and_mesh_shardings():
    """The trainer's Predictor: new parameters never retrace; inputs are split over the
    mesh's batch axes, outputs replicated; results equal the plain function."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from vlp_jax.parallel.mesh import make_mesh
    from vlp_jax.train.predict import Predictor
    mesh = make_mesh()                                       # 8 devices, data axis
    traces, seen = [], []

    def encode_image(params, images):                        # [B, 2, 2, 3] -> [B, 4]
        traces.append(1)
        jax.debug.inspect_array_sharding(images, callback=seen.append)
        return images.reshape(images.shape[0], -1) @ params["w"]

    rep = NamedSharding(mesh, P())
    predictor = Predictor({"encode_image": encode_image}, {"w": rep}, mesh)
    x = np.random.default_rng(0).normal(size=(16, 2, 2, 3)).astype(np.float32)
    for seed in range(3):
        w = np.random.default_rng(seed).normal(size=(12, 4)).astype(np.float32)
        out = predictor.bind({"w": jax.device_put(w, rep)})["encode_image"](x)
        np.testing.assert_allclose(np.asarray(out), x.reshape(16, -1) @ w, rtol=1e-5, atol=1e-5)
        assert out.sharding.is_fully_replicated
    assert len(traces) == 1
    assert seen and all(s.shard_shape((16, 2, 2, 3)) == (2, 2, 2, 3) for s in seen), seen
