"""Fusion models: single stream (ViLT/UNITER), ALBEF cross-attention fusion, co-attention."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.models.coattention import CoAttentionBlock
from vlp_jax.models.registry import build_model
from vlp_jax.models.single_stream import patch_mask_to_pixels
from vlp_jax.nn.heads import HeadTransform
from vlp_jax.nn.patch_embed import patchify
from tests.helpers import albef_cfg, single_cfg

VOCAB = dict(vocab_size=40, pad_id=0, bos_id=1, eos_id=2, mask_id=3)
TOKENS = jnp.array([[1, 7, 8, 9, 2, 0, 0, 0],
                    [1, 5, 2, 0, 0, 0, 0, 0]], jnp.int32)


def _images(seed=1, n=2):
    return jax.random.uniform(jax.random.key(seed), (n, 16, 16, 3), minval=-1, maxval=1)


def _init(model, *args):
    return jax.jit(lambda k: nn.meta.unbox(model.init(k, *args)))(jax.random.key(0))


_BUILT = {}


def _built(name, cfg):
    """(model, variables) initialised once per named config (init compiles for seconds)."""
    if name not in _BUILT:
        model = build_model(cfg, VOCAB)
        _BUILT[name] = (model, _init(model, _images(), TOKENS))
    return _BUILT[name]


def _shapes(cfg):
    """Unboxed parameter shapes of a config, without computing anything."""
    model = build_model(cfg, VOCAB)
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), _images(), TOKENS))["params"]


_JITTED = {}


def _apply(model, variables, *args, method=None):
    """model.apply compiled as one program, cached per (model, method): eager op-by-op dispatch
    and recompiling are what make tiny-model tests slow on CPU."""
    key = (id(model), method)
    if key not in _JITTED:
        _JITTED[key] = (model, jax.jit(lambda v, *a: model.apply(v, *a, method=method)))
    return _JITTED[key][1](variables, *args)


@pytest.mark.parametrize("image_cls,types", [(True, True), (False, False)])
def test_single_stream_shapes_and_finiteness(image_cls, types):
    model, variables = _built(f"single_{image_cls}", single_cfg(image_cls=image_cls,
                                                                type_embeddings=types))
    out = _apply(model, variables, _images(), TOKENS)
    chex.assert_shape(out["text"], (2, 8, 32))
    chex.assert_shape(out["image"], (2, 16 + image_cls, 32))
    chex.assert_shape([out["pooled"], out["itm_logits"]], [(2, 32), (2, 2)])
    chex.assert_shape([out["mlm_logits"], out["mrfr"], out["mrc_logits"]],
                      [(2, 8, 40), (2, 16, 48), (2, 16, 5)])
    chex.assert_tree_all_finite(out)
    assert ("type_embedding" in variables["params"]["token_embed"]) == types
    assert ("image_cls" in variables["params"]) == image_cls


def test_single_stream_is_invariant_to_text_padding():
    model, variables = _built("single_True", single_cfg())
    full = _apply(model, variables, _images(), TOKENS)
    short = _apply(model, variables, _images(), TOKENS[:, :5])
    for key in ("pooled", "itm_logits", "image"):
        np.testing.assert_allclose(short[key], full[key], atol=1e-5)
    valid = np.asarray(TOKENS[:, :5] != 0)[..., None]          # pad queries are don't-cares
    np.testing.assert_allclose(short["text"] * valid, full["text"][:, :5] * valid, atol=1e-5)
    other_text = TOKENS.at[1, 1].set(6)
    moved = _apply(model, variables, _images(), other_text)
    assert not np.allclose(moved["pooled"][1], full["pooled"][1])
    np.testing.assert_allclose(moved["pooled"][0], full["pooled"][0], atol=1e-6)


def test_masked_patches_are_zeroed_before_the_projection():
    model, variables = _built("single_True", single_cfg())
    images = _images()
    mask = jnp.zeros((2, 16), bool).at[:, 3].set(True)
    pix = patch_mask_to_pixels(mask, 4, 4)
    np.testing.assert_array_equal(patchify(pix.astype(jnp.float32), 4)[..., 0] > 0, mask)
    noisy = images + 5.0 * pix                     # only the masked patch's pixels change
    a = _apply(model, variables, images, TOKENS, mask)
    b = _apply(model, variables, noisy, TOKENS, mask)
    np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-6)
    c = _apply(model, variables, noisy, TOKENS)      # unmasked: the change is seen
    assert not np.allclose(a["pooled"], c["pooled"], atol=1e-4)


def test_mrfr_head_is_tied_to_the_patch_projection():
    model, variables = _built("single_True", single_cfg())
    params = variables["params"]
    assert set(params["mrfr_head"]) == {"transform", "bias"}    # no own output kernel
    h = jax.random.normal(jax.random.key(3), (2, 16, 32))
    pred = _apply(model, variables, h, method="mrfr_pred")
    t = HeadTransform().apply({"params": params["mrfr_head"]["transform"]}, h)
    kernel = params["patch_embed"]["proj"]["kernel"]
    np.testing.assert_allclose(pred, t @ kernel.T + params["mrfr_head"]["bias"], rtol=1e-5, atol=1e-5)
    bumped = jax.tree.map(lambda x: x, params)
    bumped["patch_embed"]["proj"]["kernel"] = kernel * 2.0
    pred2 = _apply(model, {"params": bumped}, h, method="mrfr_pred")
    np.testing.assert_allclose(pred2, 2 * (t @ kernel.T) + params["mrfr_head"]["bias"], rtol=1e-5,
                               atol=1e-5)


def test_single_stream_unimodal_embeddings_ignore_the_other_modality():
    model, variables = _built("single_True", single_cfg())
    u = _apply(model, variables, _images(), method="encode_image")
    v = _apply(model, variables, TOKENS, method="encode_text")
    np.testing.assert_allclose(jnp.linalg.norm(u, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(v, _apply(model, variables, TOKENS[:, :5], method="encode_text"),
                               atol=1e-5)
    score = _apply(model, variables, _images(), TOKENS, method="score_pairs")
    logits = _apply(model, variables, _images(), TOKENS)["itm_logits"]
    np.testing.assert_allclose(score, logits[:, 1] - logits[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", ["cross_attention", "coattention"])
def test_fusion_model_shapes_and_unit_embeddings(fusion):
    model, variables = _built(fusion, albef_cfg(fusion))
    out = _apply(model, variables, _images(), TOKENS)
    chex.assert_shape([out["image_emb"], out["text_emb"]], [(2, 24), (2, 24)])
    chex.assert_shape([out["fused_text"], out["itm_logits"], out["mlm_logits"]],
                      [(2, 8, 32), (2, 2), (2, 8, 40)])
    chex.assert_tree_all_finite(out)
    for key in ("image_emb", "text_emb"):
        np.testing.assert_allclose(jnp.linalg.norm(out[key], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["temperature"], 0.07, rtol=1e-6)


@pytest.mark.parametrize("fusion", ["cross_attention", "coattention"])
def test_fusion_uses_the_image_and_text_layers_do_not(fusion):
    model, variables = _built(fusion, albef_cfg(fusion))
    a = _apply(model, variables, _images(1), TOKENS)
    b = _apply(model, variables, _images(2), TOKENS)
    np.testing.assert_allclose(a["text_emb"], b["text_emb"], atol=1e-6)   # text-only layers
    assert not np.allclose(a["fused_text"], b["fused_text"], atol=1e-4)   # fusion sees image
    assert not np.allclose(a["itm_logits"], b["itm_logits"], atol=1e-5)
    # Text padding does not leak into the unimodal or the fused outputs.
    c = _apply(model, variables, _images(1), TOKENS[:, :5])
    np.testing.assert_allclose(c["text_emb"], a["text_emb"], atol=1e-5)
    valid = np.asarray(TOKENS[:, :5] != 0)[..., None]
    np.testing.assert_allclose(c["fused_text"] * valid, a["fused_text"][:, :5] * valid, atol=1e-5)


def test_cross_attention_fusion_has_cross_attention_in_every_fusion_layer_only():
    params = _shapes(albef_cfg())
    for i in range(2):
        assert "cross_attn" in params["fusion_encoder"][f"block{i}"]
    assert "cross_attn" not in params["text_encoder"]["block0"]


def _swap_streams(tree):
    """Renames text_* <-> image_* keys everywhere in a parameter tree."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        k2 = (k.replace("text_", "@").replace("image_", "text_").replace("@", "image_")
              if k.startswith(("text_", "image_")) else k)
        out[k2] = _swap_streams(v)
    return out


def test_coattention_block_is_symmetric_in_its_streams():
    block = CoAttentionBlock(num_heads=2, mlp_dim=64)
    t = jax.random.normal(jax.random.key(1), (2, 6, 32))
    v = jax.random.normal(jax.random.key(2), (2, 9, 32))
    tv = jnp.array([[True] * 6, [True] * 3 + [False] * 3])
    iv = jnp.ones((2, 9), bool)
    params = _init(block, t, v, tv, iv)["params"]
    t_out, v_out = _apply(block, {"params": params}, t, v, tv, iv)
    v_swapped, t_swapped = _apply(block, {"params": _swap_streams(params)}, v, t, iv, tv)
    np.testing.assert_allclose(t_swapped, t_out, atol=1e-5)
    np.testing.assert_allclose(v_swapped, v_out, atol=1e-5)
    # Each stream sees the other: changing the text moves the image stream and vice versa.
    noise = jax.random.normal(jax.random.key(5), t.shape)      # (a constant shift is LN-invisible)
    _, v_moved = _apply(block, {"params": params}, t + noise, v, tv, iv)
    assert not np.allclose(v_moved, v_out, atol=1e-4)
    # ... but not through padded text positions.
    t_padded = t.at[1, 4].add(10.0)
    t2, v2 = _apply(block, {"params": params}, t_padded, v, tv, iv)
    np.testing.assert_allclose(v2, v_out, atol=1e-5)
    np.testing.assert_allclose(t2[1, :3], t_out[1, :3], atol=1e-5)


def test_lxmert_shared_cross_attention_has_one_attention_per_block():
    params = _shapes(albef_cfg("coattention", coattention_shared=True))
    block = params["fusion_encoder"]["block0"]
    assert "shared_cross_attn" in block
    assert "attn" not in block["text_coattn"] and "attn" not in block["image_coattn"]
    unshared = _shapes(albef_cfg("coattention"))
    count = lambda p: sum(x.size for x in jax.tree.leaves(p))
    assert count(unshared) - count(params) == 2 * count(block["shared_cross_attn"])


@pytest.mark.parametrize("cfg", [single_cfg(), albef_cfg(), albef_cfg("coattention"),
                                 albef_cfg("coattention", coattention_shared=True,
                                           itm_pool="product")],
                         ids=["single", "albef", "coattention", "lxmert_product"])
def test_every_parameter_has_a_logical_annotation(cfg):
    model = build_model(cfg, VOCAB)
    boxed = jax.eval_shape(model.init, jax.random.key(0), _images(), TOKENS)
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: hasattr(x, "names"))
    missing = [x for x in leaves if not hasattr(x, "names")]
    assert not missing, f"{len(missing)} parameters without logical axis names"


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="model.fusion"):
        build_model(albef_cfg("late"), VOCAB).init(jax.random.key(0), _images(), TOKENS)
    with pytest.raises(ValueError, match="itm_pool"):
        build_model(albef_cfg(itm_pool="product"), VOCAB).init(jax.random.key(0), _images(),
                                                               TOKENS)
    with pytest.raises(ValueError, match="fusion_depth"):
        cfg = albef_cfg()
        cfg.text.fusion_depth = 0
        build_model(cfg, VOCAB)
    with pytest.raises(ValueError, match="patch_size"):
        build_model(single_cfg(image=dict(image_size=16, patch_size=5)), VOCAB).init(
            jax.random.key(0), _images(), TOKENS)
