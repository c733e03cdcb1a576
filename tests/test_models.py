"""Shapes, dtypes, finiteness and masking properties of the encoders."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.models.registry import build_model
from vlp_jax.models.text import TextTransformer
from vlp_jax.models.vit import ViT, random_keep_ids
from vlp_jax.nn.patch_embed import patchify
from tests.helpers import VOCAB, tiny_dual_config, toy_tokens as _tokens

@pytest.mark.parametrize("pool", ["cls", "map", "gap"])
def test_vit_shapes(pool):
    vit = ViT(patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64, image_size=16, pool=pool)
    images = jnp.ones((3, 16, 16, 3))
    params = vit.init(jax.random.key(0), images)
    pooled, tokens = vit.apply(params, images)
    chex.assert_shape(pooled, (3, 32))
    chex.assert_shape(tokens, (3, 16 + (pool == "cls"), 32))
    chex.assert_tree_all_finite((pooled, tokens))


def test_vit_encodes_only_kept_patches():
    vit = ViT(patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    params = vit.init(jax.random.key(0), images)
    keep = random_keep_ids(jax.random.key(2), 2, 16, 4)
    chex.assert_shape(keep, (2, 4))
    assert all(len(set(np.asarray(row))) == 4 for row in keep)
    _, tokens = vit.apply(params, images, keep_ids=keep)
    chex.assert_shape(tokens, (2, 5, 32))


def test_vit_rejects_wrong_image_size():
    vit = ViT(patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16)
    params = vit.init(jax.random.key(0), jnp.ones((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="16px"):
        vit.apply(params, jnp.ones((1, 20, 20, 3)))


def test_patchify_row_major():
    img = jnp.arange(4 * 4 * 1, dtype=jnp.float32).reshape(1, 4, 4, 1)
    p = patchify(img, 2)
    chex.assert_shape(p, (1, 4, 4))
    np.testing.assert_array_equal(p[0, 1], [2, 3, 6, 7])


@pytest.mark.parametrize("causal,pool", [(True, "eot"), (False, "cls"), (False, "mean")])
def test_text_transformer_shapes_and_padding_invariance(causal, pool):
    text = TextTransformer(vocab_size=50, width=32, depth=2, num_heads=2, mlp_dim=64,
                           context_length=10, causal=causal, pool=pool)
    tokens = _tokens()
    params = text.init(jax.random.key(0), tokens)
    pooled, seq, valid = text.apply(params, tokens)
    chex.assert_shape(pooled, (2, 32))
    chex.assert_shape(seq, (2, 10, 32))
    chex.assert_tree_all_finite(pooled)
    # Pooled output must not depend on how much padding follows the caption.
    short = tokens[:, :6]
    pooled_short, _, _ = text.apply(params, short)
    np.testing.assert_allclose(pooled_short, pooled, atol=1e-5)


def test_causal_text_prefix_does_not_see_future():
    text = TextTransformer(vocab_size=50, width=32, depth=2, num_heads=2, mlp_dim=64,
                           context_length=10, causal=True)
    a = jnp.array([[2, 7, 8, 9, 3, 0]])
    b = jnp.array([[2, 7, 8, 11, 3, 0]])
    params = text.init(jax.random.key(0), a)
    _, sa, _ = text.apply(params, a)
    _, sb, _ = text.apply(params, b)
    np.testing.assert_allclose(sa[:, :3], sb[:, :3], atol=1e-6)
    assert not np.allclose(sa[:, 3], sb[:, 3])


def test_dual_encoder_outputs_unit_norm_embeddings():
    model = build_model(tiny_dual_config(), VOCAB)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    params = model.init(jax.random.key(0), images, _tokens())
    out = model.apply(params, images, _tokens())
    chex.assert_shape([out["image_emb"], out["text_emb"]], [(2, 24), (2, 24)])
    chex.assert_type([out["image_emb"], out["text_emb"]], jnp.float32)
    np.testing.assert_allclose(jnp.linalg.norm(out["image_emb"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(out["text_emb"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], np.log(1 / 0.07), rtol=1e-6)


def test_every_parameter_has_a_logical_annotation():
    model = build_model(tiny_dual_config(pool="map"), VOCAB)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 16, 16, 3)), _tokens())
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: hasattr(x, "names"))
    missing = [x for x in leaves if not hasattr(x, "names")]
    assert not missing, f"{len(missing)} parameters without logical axis names"


def test_unknown_model_name_is_a_clear_error():
    cfg = tiny_dual_config()
    cfg.name = "nope"
    with pytest.raises(ValueError, match="model.name 'nope' is unknown"):
        build_model(cfg, VOCAB)


def test_bfloat16_compute_keeps_float32_params():
    cfg = tiny_dual_config()
    cfg.dtype = "bfloat16"
    model = build_model(cfg, VOCAB)
    images = jnp.ones((2, 16, 16, 3))
    params = model.init(jax.random.key(0), images, _tokens())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = model.apply(params, images, _tokens())
    chex.assert_tree_all_finite(out)
    chex.assert_type(out["image_emb"], jnp.float32)
