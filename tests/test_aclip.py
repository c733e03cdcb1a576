"""A-CLIP: attentive patch selection by the EMA teacher, the EMA itself, and learning."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.methods.aclip import (attention_scores, attentive_keep_ids,
                                   capture_block_attention, text_scores)
from vlp_jax.methods.registry import build_method
from vlp_jax.methods.ssl_common import image_features
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.parallel.sharding import logical_rules, param_shardings
from vlp_jax.train.metrics_log import read_metrics
from vlp_jax.train.trainer import train_and_evaluate
from tests.helpers import tiny_experiment_config

VOCAB = dict(vocab_size=50, pad_id=0, bos_id=1, eos_id=2, mask_id=3)


def _method(depth=2, pool="cls", stack=None, **method):
    model = ml_collections.ConfigDict(dict(
        name="dual_encoder", embed_dim=16, **(stack or {}),
        image=dict(type="vit", patch_size=4, width=16, depth=depth, num_heads=2, mlp_dim=32,
                   image_size=16, pool=pool),
        text=dict(width=16, depth=1, num_heads=2, mlp_dim=32, context_length=8)))
    cfg = ml_collections.ConfigDict(dict(model=model, method=dict(name="aclip", **method)))
    return build_method(cfg, VOCAB, make_mesh())


def _batch(n=8, seed=0):
    r = np.random.default_rng(seed)
    text = np.zeros((n, 8), np.int32)
    text[:, 0], text[:, 1:4], text[:, 4] = 1, r.integers(4, 50, (n, 3)), 2
    return dict(image=jnp.asarray(r.uniform(-1, 1, (n, 16, 16, 3)), jnp.float32),
                text=jnp.asarray(text))


def _init(method, batch):
    """(params, aux) initialised under jit (eager init compiles op by op: slow on CPU)."""
    params = jax.jit(lambda k: nn.meta.unbox(method.init_params(k, batch)))(jax.random.key(0))
    return params, method.init_aux(params)


def test_attentive_keep_ids_are_the_top_scores_in_raster_order():
    scores = jax.random.uniform(jax.random.key(1), (6, 16))
    ids = np.asarray(attentive_keep_ids(scores, 5))
    s = np.asarray(scores)
    assert ids.shape == (6, 5) and (np.diff(ids, axis=1) > 0).all()
    for row, kept in zip(s, ids):
        dropped = np.setdiff1d(np.arange(16), kept)
        assert row[kept].min() > row[dropped].max()
        np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-row)[:5]))


def test_captured_attention_is_every_blocks_softmax_and_leaves_the_forward_unchanged():
    method = _method(depth=3)
    batch = _batch()
    params, _ = _init(method, batch)
    (emb, pooled, tokens), weights = capture_block_attention(method.model, params, batch["image"])
    assert weights.shape[0] == 3                               # one per block, not the pooling
    for w in weights:
        assert w.shape == (8, 2, 17, 17)                       # [B, heads, 1 + 16, 1 + 16]
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    ref = image_features(method.model, params, batch["image"])
    # the weights come from the explicit softmax path, the reference from the fused attention:
    # the same function up to float32 rounding (~1e-7 of values of order 1, over 3 blocks).
    for a, b in zip((emb, pooled, tokens), ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_captured_attention_is_the_same_with_scanned_rematerialised_layers():
    """The scores come from the tower's return_weights path, so scan_layers and remat (which
    a method interceptor cannot see through) give the loop's weights on restacked params."""
    from vlp_jax.nn.transformer import stack_layers
    loop = _method(depth=2)
    scanned = _method(depth=2, stack=dict(scan_layers=True, remat=True))
    batch = _batch()
    params, _ = _init(loop, batch)
    (_, _, t0), w0 = capture_block_attention(loop.model, params, batch["image"])
    (_, _, t1), w1 = jax.jit(lambda p, x: capture_block_attention(scanned.model, p, x))(
        stack_layers(params), batch["image"])
    assert w1.shape == w0.shape == (2, 8, 2, 17, 17)
    np.testing.assert_allclose(w1, w0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t1, t0, rtol=1e-5, atol=1e-5 * float(np.abs(t0).max()))


def test_attention_score_is_the_class_token_row_averaged_over_layers_and_heads():
    w = [jax.random.uniform(jax.random.key(i), (2, 3, 5, 5)) for i in range(2)]
    expected = (sum(x[:, :, 0, 1:].mean(1) for x in w) / 2)
    np.testing.assert_allclose(attention_scores(w, 4), expected, rtol=1e-6)
    no_cls = attention_scores(w, 5)                            # gap / map pooling
    np.testing.assert_allclose(no_cls, sum(x.mean((1, 2)) for x in w) / 2, rtol=1e-6)


def test_text_score_prefers_the_patch_most_similar_to_the_caption():
    patches = jnp.eye(4)[None]                                 # 4 orthogonal patch embeddings
    text = jnp.array([[0.0, 0.0, 1.0, 0.0]])
    s = text_scores(patches, text, jnp.array(10.0))
    np.testing.assert_allclose(s.sum(), 1.0, rtol=1e-6)
    assert int(jnp.argmax(s)) == 2


@pytest.mark.parametrize("score", ["attention", "text", "attention_text"])
def test_method_keeps_the_teachers_highest_scored_patches(score):
    method = _method(keep_ratio=0.25, score=score)
    batch = _batch()
    params, aux = _init(method, batch)
    scores, _ = method.teacher_view(aux["teacher"], batch["image"], batch["text"])
    ids, _ = method.keep_ids_for(aux["teacher"], batch["image"], batch["text"])
    assert ids.shape == (8, 4)                                 # 25% of 16 patches
    s, ids = np.asarray(scores), np.asarray(ids)
    for row, kept in zip(s, ids):
        dropped = np.setdiff1d(np.arange(16), kept)
        assert row[kept].min() >= row[dropped].max()
    if score == "attention":                                   # independent of the caption
        other = dict(batch, text=batch["text"][::-1])
        np.testing.assert_array_equal(
            ids, method.keep_ids_for(aux["teacher"], other["image"], other["text"])[0])


def test_scores_come_from_the_teacher_not_the_student():
    """The student's forward keeps the patches the *teacher* picks: perturbing the student
    leaves the keep ids unchanged (while its features move), perturbing the teacher changes
    them."""
    method = _method(keep_ratio=0.25)
    batch = _batch()
    params, aux = _init(method, batch)
    forward = jax.jit(lambda p, a: method.forward(p, a, batch, jax.random.key(0)))
    base = forward(params, aux)
    jitted_noise = jax.jit(lambda tree, key: jax.tree.map(       # jitted: one compile, not
        lambda x: x + 0.5 * jax.random.normal(key, x.shape, x.dtype), tree))   # one per leaf
    noisy = lambda tree, seed: jitted_noise(tree, jax.random.key(seed))
    student_moved = forward(noisy(params, 1), aux)
    np.testing.assert_array_equal(student_moved["keep_ids"][0], base["keep_ids"][0])
    assert not np.allclose(student_moved["pooled"][0], base["pooled"][0])
    teacher_moved = forward(params, dict(aux, teacher=noisy(aux["teacher"], 2)))
    assert (np.asarray(teacher_moved["keep_ids"][0]) != np.asarray(base["keep_ids"][0])).any()


def test_distillation_term_is_a_clips_4_times_one_minus_cosine():
    """A-CLIP's loss 2 * mean(2 - 2 cos) = 4 (1 - cos) between pred(proj(student)) and the EMA
    proj(teacher) (the version before this fix weighted (1 - cos) by 1: 4x weaker)."""
    from vlp_jax.methods.ssl_common import ProjectionMLP
    method = _method(keep_ratio=0.5, distill_weight=1.0, ssl_mlp_dim=32, ssl_emb_dim=8)
    batch = _batch()
    params, aux = _init(method, batch)
    params = dict(params, aclip_pred=jax.tree.map(lambda x: x + 0.1, params["aclip_pred"]))
    _, metrics, _ = jax.jit(method.loss)(params, aux, batch, jax.random.key(1), jnp.array(0))
    out = jax.jit(method.forward)(params, aux, batch, jax.random.key(1))
    proj, pred = ProjectionMLP(32, 8, num_layers=2), ProjectionMLP(32, 8, num_layers=2)
    online = pred.apply({"params": params["aclip_pred"]},
                        proj.apply({"params": params["aclip_proj"]}, out["pooled"][0]))
    target = proj.apply({"params": aux["teacher"]["aclip_proj"]}, out["teacher_pooled"][0])
    cos = np.sum(np.asarray(online) * np.asarray(target), -1) / (
        np.linalg.norm(online, axis=-1) * np.linalg.norm(target, axis=-1))
    expected = 4.0 * np.mean(1.0 - cos)
    assert expected > 1e-3
    np.testing.assert_allclose(metrics["loss/distill"], expected, rtol=1e-4)


def test_ema_update_and_shardings_follow_the_params():
    method = _method(ema_momentum=0.9, distill_weight=1.0)
    batch = _batch()
    params, aux = _init(method, batch)
    assert set(aux["teacher"]) >= {"image_tower", "text_tower", "aclip_proj"}
    assert "aclip_pred" not in aux["teacher"]                  # the predictor is online-only
    moved = jax.tree.map(lambda x: x + 1.0, params)
    new = method.after_update(moved, aux, jnp.array(0))
    for t, t0 in zip(jax.tree.leaves(new["teacher"]), jax.tree.leaves(aux["teacher"])):
        np.testing.assert_allclose(t, t0 + 0.1, rtol=1e-5, atol=1e-6)
    boxed = jax.eval_shape(lambda k: method.init_params(k, batch), jax.random.key(0))
    p_sh = param_shardings(boxed, method.mesh, logical_rules())
    sh = method.aux_shardings(jax.eval_shape(method.init_aux, params), p_sh)
    assert jax.tree.structure(sh) == jax.tree.structure(aux)


def test_rejects_bad_config():
    with pytest.raises(ValueError, match="method.score"):
        _method(score="random")
    with pytest.raises(ValueError, match="keep_ratio"):
        _method(keep_ratio=0.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        _method(mask_ratio=0.5)
    with pytest.raises(ValueError, match="accumulation"):
        _method(accumulation="grad_cache", micro_batches=2)


@pytest.mark.slow
def test_aclip_learns_far_above_chance(shapes_data_config, tmp_path):
    config = tiny_experiment_config(shapes_data_config, "aclip_shapes.py:smoke,lite", 150,
                                    distill_weight=1.0, ssl_mlp_dim=64, ssl_emb_dim=32)
    assert config.method.keep_ratio == 0.5 and config.method.score == "attention"
    result = train_and_evaluate(config, str(tmp_path), progress=False)
    rows = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    assert rows[-1]["train/loss/itc"] < rows[0]["train/loss/itc"]
    assert rows[-1]["train/loss/distill"] < rows[0]["train/loss/distill"]
    ev = result["eval"]
    print("A-CLIP eval", ev, "train", result["train"])
    assert ev["zeroshot/top1"] > 3 * ev["zeroshot/chance"], ev
    assert ev["retrieval/t2i_r10"] > 3 * 10 / 128 * 100, ev
