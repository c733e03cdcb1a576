"""GIT, the SimVLM encoder-decoder and CoCa: outputs, masks, and cached generation."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.models.encoder_decoder import split_prefix
from vlp_jax.models.generation import generate_fn, uncached_generate_fn
from vlp_jax.models.registry import build_model

VOCAB = dict(vocab_size=40, pad_id=0, bos_id=1, eos_id=2, unk_id=3, mask_id=4)
VIT = dict(type="vit", patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16)


def _cfg(name, **stack):
    if name == "git":
        cfg = dict(width=32, depth=2, num_heads=2, mlp_dim=64, context_length=8)
    elif name == "encoder_decoder":
        cfg = dict(width=32, encoder_depth=1, decoder_depth=2, num_heads=2, mlp_dim=64,
                   context_length=8)
    else:
        cfg = dict(embed_dim=16, num_queries=4,
                   text=dict(width=32, unimodal_depth=1, multimodal_depth=1, num_heads=2,
                             mlp_dim=64, context_length=8))
    return ml_collections.ConfigDict(dict(name=name, image=VIT, **cfg, **stack))


def _inputs(n=3, seed=0):
    r = np.random.default_rng(seed)
    tokens = np.zeros((n, 8), np.int32)
    tokens[:, 0] = 1
    tokens[:, 1:6] = r.integers(5, 40, (n, 5))
    tokens[:, 6] = 2
    tokens[-1, 4:] = [2, 0, 0, 0]                      # a shorter caption
    return jnp.asarray(r.uniform(-1, 1, (n, 16, 16, 3)), jnp.float32), jnp.asarray(tokens)


def _init(name, **stack):
    model = build_model(_cfg(name, **stack), VOCAB)
    images, tokens = _inputs()
    params = jax.jit(model.init)(jax.random.key(0), images, tokens)["params"]
    # Spread the tied read-out so greedy paths are not near-ties of random logits.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 8.0 if "embedding" in jax.tree_util.keystr(p) else x, params)
    return model, params, images, tokens


NAMES = ("git", "encoder_decoder", "coca")


@pytest.mark.parametrize("name", NAMES)
def test_teacher_forcing_outputs_and_causality(name):
    """lm_logits[:, t] predicts lm_targets[:, t] = token t + 1 and depends on tokens <= t only."""
    model, params, images, tokens = _init(name)
    apply = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    out = apply(params, images, tokens)
    assert out["lm_logits"].shape == (3, 7, 40)
    np.testing.assert_array_equal(out["lm_targets"], tokens[:, 1:])
    np.testing.assert_array_equal(out["lm_weights"], (tokens[:, 1:] != 0).astype(np.float32))
    changed = tokens.at[:, 3].set(jnp.where(tokens[:, 3] == 7, 8, 7))
    out2 = apply(params, images, changed)
    np.testing.assert_allclose(out2["lm_logits"][:, :3], out["lm_logits"][:, :3],
                               rtol=1e-5, atol=1e-5)                  # earlier: unchanged
    assert not np.allclose(out2["lm_logits"][:, 3], out["lm_logits"][:, 3], atol=1e-3)
    other = apply(params, images[::-1], tokens)
    assert not np.allclose(other["lm_logits"][:, 0], out["lm_logits"][:, 0], atol=1e-3)


def test_coca_unimodal_text_never_sees_the_image():
    model, params, images, tokens = _init("coca")
    apply = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    a, b = apply(params, images, tokens), apply(params, -images, tokens)
    np.testing.assert_array_equal(a["text_emb"], b["text_emb"])
    assert not np.allclose(a["image_emb"], b["image_emb"], atol=1e-3)
    assert not np.allclose(a["lm_logits"], b["lm_logits"], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(a["text_emb"], axis=-1), 1.0, rtol=1e-5)


def test_prefix_split_and_the_prefix_lm_masks():
    """A prefix word is seen by every target (bidirectional encoder) and is not predicted;
    a target word is seen by no earlier target."""
    tokens = jnp.array([[1, 11, 12, 13, 14, 2, 0, 0]], jnp.int32)
    prefix, suffix = split_prefix(tokens, jnp.array([2]), 0)
    np.testing.assert_array_equal(prefix, [[1, 11, 12, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(suffix, [[1, 13, 14, 2, 0, 0, 0, 0]])
    model, params, images, _ = _init("encoder_decoder")
    images = images[:1]
    apply = jax.jit(lambda p, t, q: model.apply({"params": p}, images, t, q))
    base = apply(params, tokens, jnp.array([2]))
    np.testing.assert_array_equal(base["lm_targets"], tokens[:, 1:])
    np.testing.assert_array_equal(base["lm_weights"], [[0, 0, 1, 1, 1, 0, 0]])  # 13 14 eos
    in_prefix = apply(params, tokens.at[0, 1].set(20), jnp.array([2]))
    assert not np.allclose(in_prefix["lm_logits"][0, 2], base["lm_logits"][0, 2], atol=1e-3)
    in_target = apply(params, tokens.at[0, 4].set(20), jnp.array([2]))      # w_4, a target
    np.testing.assert_allclose(in_target["lm_logits"][0, :4], base["lm_logits"][0, :4],
                               rtol=1e-5, atol=1e-5)
    no_prefix = apply(params, tokens, jnp.array([0]))     # plain captioning: all targets count
    np.testing.assert_array_equal(no_prefix["lm_weights"], [[1, 1, 1, 1, 1, 0, 0]])
    assert not np.allclose(no_prefix["lm_logits"][0, 2], base["lm_logits"][0, 2], atol=1e-3)


@pytest.mark.parametrize("name,scan", [("git", False), ("git", True),
                                       ("encoder_decoder", False), ("coca", False)])
def test_cached_generation_equals_uncached_and_beam_one_equals_greedy(name, scan):
    model, params, images, _ = _init(name, scan_layers=scan)
    if scan:
        from vlp_jax.nn.transformer import stack_layers
        params = stack_layers(params)
    cached = jax.jit(generate_fn(model, VOCAB, max_length=8))(params, images)
    slow = jax.jit(uncached_generate_fn(model, VOCAB, max_length=8))(params, images)
    np.testing.assert_array_equal(cached, slow)
    assert cached.shape == (3, 8) and (np.asarray(cached)[:, 0] == 1).all()
    assert len({tuple(r) for r in np.asarray(cached)}) > 1       # depends on the image
    beam1 = jax.jit(generate_fn(model, VOCAB, max_length=8, mode="beam", beam_size=1))(
        params, images)
    np.testing.assert_array_equal(beam1, cached)


def test_generation_sharded_over_eight_devices_equals_one_device():
    """The trainer's Predictor jits `generate` with the batch split over the mesh (parameters
    on their shardings): the tokens are those of the single-device call."""
    import flax.linen as nn
    from vlp_jax.methods.registry import build_method
    from vlp_jax.parallel.mesh import make_mesh
    from vlp_jax.parallel.sharding import DEFAULT_RULES, param_shardings
    from vlp_jax.train.predict import Predictor
    assert len(jax.devices()) == 8
    mesh = make_mesh()
    cfg = ml_collections.ConfigDict(dict(model=_cfg("git"), method=dict(name="captioning")))
    method = build_method(cfg, VOCAB, mesh)
    images, tokens = _inputs(n=8)
    boxed = jax.eval_shape(lambda: method.init_params(jax.random.key(0),
                                                      dict(image=images, text=tokens)))
    shardings = param_shardings(boxed, mesh, DEFAULT_RULES)
    params = jax.jit(lambda k: nn.meta.unbox(method.init_params(k, dict(image=images,
                                                                        text=tokens))),
                     out_shardings=shardings)(jax.random.key(0))
    sharded = Predictor(method.predict_fns(), shardings, mesh).call("generate", params, images)
    single = jax.jit(method.predict_fns()["generate"])(jax.device_get(params), images)
    np.testing.assert_array_equal(sharded, single)
    assert sharded.shape == (8, 8)
