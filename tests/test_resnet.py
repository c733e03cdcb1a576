"""The ResNet image tower: shapes, no batch statistics, logical names, swappable by config."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.models.registry import build_model
from vlp_jax.models.resnet import ResNet, StdConv
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.parallel.sharding import DEFAULT_RULES, param_shardings

VOCAB = {"vocab_size": 50, "pad_id": 0}


def _tiny(**kw):
    args = dict(width=8, stage_sizes=(1, 1), image_size=16, norm_groups=4)
    args.update(kw)
    return ResNet(**args)


@pytest.mark.parametrize("block,pool", [("basic", "gap"), ("bottleneck", "gap"), ("basic", "map")])
def test_resnet_shapes(block, pool):
    net = _tiny(block=block, pool=pool)
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    variables = net.init(jax.random.key(1), images)
    assert set(variables) == {"params"}, "a GroupNorm ResNet must keep no batch_stats"
    pooled, tokens = net.apply(variables, images)
    channels = 16 * (4 if block == "bottleneck" else 1)
    chex.assert_shape(pooled, (3, channels))
    chex.assert_shape(tokens, (3, 8 * 8, channels))     # stage 1 halves 16 -> 8
    chex.assert_tree_all_finite((pooled, tokens))


def test_imagenet_stem_downsamples_four_times():
    net = _tiny(stem_kernel=7, stem_stride=2, stem_pool=True, image_size=32)
    images = jnp.zeros((1, 32, 32, 3))
    _, tokens = net.apply(net.init(jax.random.key(0), images), images)
    chex.assert_shape(tokens, (1, 4 * 4, 16))           # 32 /2 /2 (stem) /2 (stage 1)


def test_each_example_is_independent_of_the_rest_of_the_batch():
    """No batch statistics: an example's embedding is the same alone or in any batch."""
    net = _tiny()
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = net.init(jax.random.key(1), images)
    together, _ = net.apply(variables, images)
    alone, _ = net.apply(variables, images[2:3])
    other = images.at[0].set(100.0)
    changed, _ = net.apply(variables, other)
    np.testing.assert_allclose(together[2], alone[0], atol=1e-5)
    np.testing.assert_allclose(together[1:], changed[1:], atol=1e-5)


def test_weight_standardised_kernel_is_scale_invariant():
    """Scaling a kernel leaves a standardised convolution's output unchanged."""
    conv = StdConv(6, 3)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    params = nn.meta.unbox(conv.init(jax.random.key(1), x))
    scaled = jax.tree.map(lambda w: 7.0 * w + 0.0, params)
    np.testing.assert_allclose(conv.apply(params, x), conv.apply(scaled, x), atol=1e-4)


def test_every_parameter_has_logical_axis_names():
    net = _tiny(block="bottleneck", pool="map")
    boxed = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
    names = {n for leaf in leaves for n in leaf.names}
    assert {"conv_h", "conv_w", "conv_in", "conv_out"} <= names


def test_conv_parameters_are_replicated_under_the_default_fsdp_rules():
    """conv_* names are not in DEFAULT_RULES, so they fall back to replicated (documented)."""
    net = _tiny()
    boxed = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    mesh = make_mesh(ml_collections.ConfigDict(dict(axes={"data": 2, "fsdp": 4})))
    shardings = param_shardings(boxed, mesh, DEFAULT_RULES)
    for sharding in jax.tree.leaves(shardings):
        assert all(axis is None for axis in sharding.spec), sharding


def test_resnet_rejects_patch_masking_and_wrong_sizes():
    net = _tiny()
    images = jnp.zeros((1, 16, 16, 3))
    variables = net.init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="mask_ratio"):
        net.apply(variables, images, keep_ids=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="16px"):
        net.apply(variables, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="model.image.block"):
        _tiny(block="dense").init(jax.random.key(0), images)


def test_dual_encoder_swaps_in_the_resnet_by_config():
    cfg = ml_collections.ConfigDict(dict(
        name="dual_encoder", embed_dim=24,
        image=dict(type="resnet", width=8, stage_sizes=[1, 1], image_size=16, norm_groups=4),
        text=dict(width=32, depth=1, num_heads=2, context_length=8, causal=False, pool="cls")))
    model = build_model(cfg, VOCAB)
    assert isinstance(model.image_tower, ResNet)
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    tokens = jnp.array([[2, 5, 6, 3, 0, 0, 0, 0], [2, 7, 3, 0, 0, 0, 0, 0]], jnp.int32)
    variables = nn.meta.unbox(model.init(jax.random.key(1), images, tokens))
    out = model.apply(variables, images, tokens)
    chex.assert_shape((out["image_emb"], out["text_emb"]), (2, 24))
    np.testing.assert_allclose(jnp.linalg.norm(out["image_emb"], axis=-1), 1.0, atol=1e-5)
    cfg.image.type = "convnext"
    with pytest.raises(ValueError, match="model.image.type 'convnext' is unknown"):
        build_model(cfg, VOCAB)
