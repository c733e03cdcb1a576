"""Mesh construction, config validation and parameter placement on 8 simulated devices."""
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vlp_jax.models.registry import build_model
from vlp_jax.parallel.mesh import make_mesh, mesh_shape, to_global_batch
from vlp_jax.parallel.sharding import param_shardings
from tests.helpers import VOCAB, tiny_dual_config, toy_tokens as _tokens


def test_mesh_defaults_to_all_devices_on_data():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "model": 1}


@pytest.mark.parametrize("axes,expected", [
    ({"data": -1, "fsdp": 2}, {"data": 4, "fsdp": 2, "model": 1}),
    ({"data": 2, "model": 4}, {"data": 2, "fsdp": 1, "model": 4}),
])
def test_mesh_shape_resolves_free_axis(axes, expected):
    assert mesh_shape(axes, 8) == expected


@pytest.mark.parametrize("axes,match", [
    ({"data": 16}, "needs 16 devices"),
    ({"data": 3, "fsdp": -1}, "not divisible"),
    ({"tensor": 8}, "unknown axes"),
    ({"data": -1, "fsdp": -1}, "at most one"),
])
def test_bad_mesh_configs_are_named(axes, match):
    with pytest.raises(ValueError, match=match):
        mesh_shape(axes, 8)


def test_fsdp_rules_split_large_weights():
    mesh = make_mesh(ml_collections.ConfigDict({"axes": {"fsdp": 8}}))
    model = build_model(tiny_dual_config(), VOCAB)
    boxed = jax.eval_shape(model.init, jax.random.key(0), np.ones((1, 16, 16, 3)), _tokens())
    shardings = param_shardings(boxed["params"], mesh, (("embed", "fsdp"), ("vocab", "fsdp")))
    fc1 = shardings["image_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
    assert fc1.spec[0] == "fsdp"
    assert shardings["logit_scale"].spec == P()
    # vocab (50) is not divisible by 8: that dimension stays replicated instead of failing.
    table = shardings["text_tower"]["token_embed"]["embedding"]
    assert table.spec == P(None, "fsdp")


def test_to_global_batch_splits_over_data():
    mesh = make_mesh()
    batch = to_global_batch({"x": np.arange(16 * 3).reshape(16, 3)}, mesh)
    assert batch["x"].shape == (16, 3)
    assert len(batch["x"].addressable_shards) == 8
    assert batch["x"].addressable_shards[0].data.shape == (2, 3)


def test_optimizer_moments_follow_their_parameters():
    from vlp_jax.methods.registry import build_method
    from vlp_jax.train.optim import make_optimizer
    from vlp_jax.train.step import state_shardings
    mesh = make_mesh(ml_collections.ConfigDict({"axes": {"fsdp": 8}}))
    cfg = ml_collections.ConfigDict(dict(
        model=tiny_dual_config(), method=dict(name="contrastive"),
        optim=dict(lr=1e-3)))
    method = build_method(cfg, VOCAB, mesh)
    batch = dict(image=np.zeros((8, 16, 16, 3), np.float32), text=np.zeros((8, 10), np.int32))
    _, _, sh = state_shardings(method, lambda m: make_optimizer(cfg.optim, 10, m),
                               jax.random.key(0), batch, (("embed", "fsdp"),))
    moments = [(jax.tree_util.keystr(p), s) for p, s in
               jax.tree_util.tree_leaves_with_path(sh.opt_state) if "fc1" in jax.tree_util.keystr(p)
               and "kernel" in jax.tree_util.keystr(p)]
    assert len(moments) >= 2      # Adam's mu and nu
    assert all(s.spec[0] == "fsdp" for _, s in moments), moments


def test_mesh_over_a_subset_of_the_devices():
    mesh = make_mesh(ml_collections.ConfigDict(dict(axes={"data": -1}, num_devices=1)))
    assert mesh.devices.size == 1 and mesh.devices.flat[0] == jax.devices()[0]
    assert make_mesh(ml_collections.ConfigDict(dict(num_devices=4))).shape["data"] == 4
    with pytest.raises(ValueError, match="num_devices=9"):
        make_mesh(ml_collections.ConfigDict(dict(num_devices=9)))


def test_indivisible_dimension_warns_naming_parameter_dimension_and_axis():
    """A dimension its rule's mesh axis does not divide is replicated, with a warning naming
    the parameter path, the dimension and the axis; a dividing one shards silently."""
    import warnings

    import flax.linen as nn
    from vlp_jax.parallel.sharding import ShardingFallbackWarning
    mesh = make_mesh(ml_collections.ConfigDict({"axes": {"fsdp": 8}}))
    box = lambda shape, names: nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct(shape, np.float32), names)
    params = {"tower": {"embed": {"embedding": box((50, 32), ("vocab", "embed"))},
                        "fc": {"kernel": box((32, 64), ("embed", "mlp"))}}}
    rules = (("vocab", "fsdp"), ("mlp", "fsdp"), ("embed", None))
    with pytest.warns(ShardingFallbackWarning) as caught:
        shardings = param_shardings(params, mesh, rules)
    messages = [str(w.message) for w in caught if w.category is ShardingFallbackWarning]
    assert len(messages) == 1, messages
    assert "tower/embed/embedding" in messages[0] and "dimension 0 (size 50)" in messages[0]
    assert "'fsdp' (size 8)" in messages[0]
    assert shardings["tower"]["embed"]["embedding"].spec == P(None, None)
    assert shardings["tower"]["fc"]["kernel"].spec == P(None, "fsdp")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShardingFallbackWarning)      # divisible: no warning
        param_shardings({"fc": params["tower"]["fc"]}, mesh, rules)
