"""MaskCLIP: masking helpers, the masked-distillation losses, the method's pieces, learning."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.losses.masked_distill import (bert_mask_tokens, feature_distance, layer_normalize,
                                           mask_from_keep_ids, masked_feature_loss)
from vlp_jax.methods.maskclip import IMAGE_HEAD, TEXT_HEAD
from vlp_jax.methods.registry import build_method
from vlp_jax.models.vit import random_keep_ids
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.train.metrics_log import read_metrics
from vlp_jax.train.trainer import train_and_evaluate
from tests.helpers import tiny_experiment_config

VOCAB = dict(vocab_size=50, pad_id=0, bos_id=1, eos_id=2, mask_id=3)
SPECIAL = (0, 1, 2, 3)


def _method(**method):
    model = ml_collections.ConfigDict(dict(
        name="dual_encoder", embed_dim=16,
        image=dict(type="vit", patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32,
                   image_size=16),
        text=dict(width=16, depth=1, num_heads=2, mlp_dim=32, context_length=8)))
    cfg = ml_collections.ConfigDict(dict(model=model, method=dict(name="maskclip", **method)))
    return build_method(cfg, VOCAB, make_mesh())


def _batch(n=8, seed=0):
    r = np.random.default_rng(seed)
    text = np.zeros((n, 8), np.int32)
    text[:, 0], text[:, 1:5], text[:, 5] = 1, r.integers(4, 50, (n, 4)), 2
    return dict(image=jnp.asarray(r.uniform(-1, 1, (n, 16, 16, 3)), jnp.float32),
                text=jnp.asarray(text))


def _init(method, batch):
    """Parameters initialised under jit (eager init compiles op by op: slow on CPU)."""
    return jax.jit(lambda k: nn.meta.unbox(method.init_params(k, batch)))(jax.random.key(0))


def test_mask_from_keep_ids_marks_exactly_the_removed_patches():
    ids = random_keep_ids(jax.random.key(0), 4, 16, 5)
    mask = np.asarray(mask_from_keep_ids(ids, 16))
    assert mask.sum() == 4 * 11
    for row, kept in zip(mask, np.asarray(ids)):
        assert not row[kept].any()


def test_masked_feature_loss_ignores_visible_positions():
    k1, k2 = jax.random.split(jax.random.key(0))
    pred, target = jax.random.normal(k1, (2, 6, 4)), jax.random.normal(k2, (2, 6, 4))
    mask = jnp.array([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], bool)
    for kind in ("cosine", "smooth_l1"):
        loss = masked_feature_loss(pred, target, mask, kind)
        changed = pred.at[~mask].set(100.0)
        np.testing.assert_allclose(masked_feature_loss(changed, target, mask, kind), loss,
                                   rtol=1e-6)
        grad = jax.grad(lambda p: masked_feature_loss(p, target, mask, kind))(pred)
        assert np.all(np.asarray(grad)[~np.asarray(mask)] == 0)
        expected = np.mean(np.asarray(feature_distance(pred, target, kind))[np.asarray(mask)])
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
        assert float(masked_feature_loss(target, target, mask, kind)) < 1e-5
    grad_t = jax.grad(lambda t: masked_feature_loss(pred, t, mask))(target)
    assert np.all(np.asarray(grad_t) == 0)                    # the teacher's side is a constant


def test_layer_normalize_gives_zero_mean_unit_variance():
    x = layer_normalize(3.0 + 2.0 * jax.random.normal(jax.random.key(0), (5, 32)))
    np.testing.assert_allclose(x.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.var(-1), 1.0, rtol=1e-3)


def test_bert_masking_spares_special_tokens_and_keeps_the_layout():
    text = _batch(n=256)["text"]
    corrupted, chosen = bert_mask_tokens(jax.random.key(0), text, 3, 50, SPECIAL, 0.3)
    text, corrupted, chosen = map(np.asarray, (text, corrupted, chosen))
    special = np.isin(text, SPECIAL)
    assert not chosen[special].any()
    np.testing.assert_array_equal(corrupted[~chosen], text[~chosen])
    assert ((corrupted != 0) == (text != 0)).all()             # no pad created or removed
    frac = chosen.sum() / (~special).sum()
    assert 0.25 < frac < 0.35, frac
    to_mask = (corrupted[chosen] == 3).mean()
    assert 0.7 < to_mask < 0.9, to_mask


def test_decoders_live_beside_the_dual_encoder_and_not_in_the_teacher():
    method = _method(mim_mask_ratio=0.5)
    batch = _batch()
    params = _init(method, batch)
    assert {IMAGE_HEAD, TEXT_HEAD} <= set(params)
    teacher = method.init_aux(params)["teacher"]
    assert not {IMAGE_HEAD, TEXT_HEAD} & set(teacher)
    # the evaluators' prediction functions ignore the extra heads
    fns = method.predict_fns()
    assert jax.jit(fns["encode_image"])(params, batch["image"]).shape == (8, 16)


def _grad_norm(tree):
    return float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(tree)))


def test_loss_is_the_weighted_sum_of_its_terms():
    method = _method(mim_mask_ratio=0.5, text_mask_prob=0.4, mim_weight=0.5, text_weight=2.0)
    batch = _batch()
    params = _init(method, batch)
    aux = method.init_aux(params)
    loss, metrics, _ = jax.jit(method.loss)(params, aux, batch, jax.random.key(1), jnp.array(0))
    assert np.isfinite(float(loss)) and float(metrics["loss/mim"]) > 0
    np.testing.assert_allclose(
        loss, metrics["loss/itc"] + 0.5 * metrics["loss/mim"] + 2.0 * metrics["loss/text"],
        rtol=1e-5)


def test_mlm_objective_predicts_token_ids_through_the_tied_embedding():
    method = _method(text_objective="mlm", text_mask_prob=0.4)
    batch = _batch()
    params = _init(method, batch)
    teacher = method.init_aux(params)["teacher"]

    def loss_fn(p):
        return method.text_loss(p, teacher, batch["text"], jax.random.key(2))

    (loss, acc), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert 0.5 * np.log(50) < float(loss) < 3 * np.log(50)    # near-uniform over 50 ids at init
    assert 0.0 <= float(acc) <= 1.0
    assert _grad_norm(grads[TEXT_HEAD]) > 0
    assert _grad_norm(grads["text_tower"]["token_embed"]) > 0   # the tied read-out


def test_rejects_bad_config():
    with pytest.raises(ValueError, match="mim_mask_ratio"):
        _method(mim_mask_ratio=1.0)
    with pytest.raises(ValueError, match="method.distance"):
        _method(distance="l3")
    with pytest.raises(ValueError, match="text_objective"):
        _method(text_objective="caption")


@pytest.mark.slow
def test_maskclip_learns_far_above_chance(shapes_data_config, tmp_path):
    config = tiny_experiment_config(shapes_data_config, "maskclip_shapes.py:smoke,mask=0.5", 150,
                                    decoder_heads=2)
    assert config.method.text_objective == "distill" and config.method.mim_weight == 1.0
    result = train_and_evaluate(config, str(tmp_path), progress=False)
    rows = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    for key in ("train/loss/itc", "train/loss/mim", "train/loss/text"):
        assert rows[-1][key] < rows[0][key], key
    ev = result["eval"]
    print("MaskCLIP eval", ev, "train", result["train"])
    assert ev["zeroshot/top1"] > 3 * ev["zeroshot/chance"], ev
    assert ev["retrieval/t2i_r10"] > 3 * 10 / 128 * 100, ev
