"""The contrastive family (ALIGN, SigLIP, LiT, FLIP): the pieces each adds, and that each
learns on the shapes data through the one trainer.

Learning runs use tiny models on the session's tiny dataset; LiT warm-starts from a tiny
CLIP trained once per module (the `clip_checkpoint` fixture).
"""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.config_args import load_config
from vlp_jax.methods.registry import build_method
from vlp_jax.parallel.mesh import make_mesh, to_global_batch
from vlp_jax.train.freeze import trainable_mask
from vlp_jax.train.warm_start import WarmStartError, load_param_subtrees, splice
from tests.helpers import VOCAB, paired_batch as _batch, tiny_dual_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- FLIP pieces

def _flip_method(mesh, ratio, tuning=0, total=10, patch=4):
    cfg = ml_collections.ConfigDict(dict(model=tiny_dual_config(), method=dict(
        name="contrastive", loss="softmax", mask_ratio=ratio, unmasked_tuning_steps=tuning,
        total_steps=total)))
    cfg.model.image.update(patch_size=patch, depth=2)
    return build_method(cfg, VOCAB, mesh)


def _image_encoder_flops(ratio):
    method = _flip_method(make_mesh(), ratio, patch=2)          # 16 px / 2 = 64 patches
    images = jnp.zeros((8, 16, 16, 3))
    params = jax.eval_shape(lambda k: nn.meta.unbox(method.init_params(
        k, dict(image=images, text=jnp.zeros((8, 10), jnp.int32)))), jax.random.key(0))

    def encode(p, x, key):
        return method.model.apply({"params": p}, x, method.keep_ids(key, x),
                                  method="encode_image")
    compiled = jax.jit(encode).lower(params, images, jax.random.key(1)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


def test_flip_masking_cuts_the_image_encoder_cost():
    full, half, quarter = (_image_encoder_flops(r) for r in (0.0, 0.5, 0.75))
    assert half < 0.6 * full, (half, full)
    assert quarter < 0.35 * full, (quarter, full)
    assert quarter < half


def test_unmasked_tuning_switches_off_masking_for_the_last_steps():
    """value_and_grad equals the masked loss before `total - tuning` and the unmasked after."""
    mesh = make_mesh()
    method = _flip_method(mesh, 0.75, tuning=3, total=10)
    batch = to_global_batch(_batch(n=16), mesh)
    params = nn.meta.unbox(jax.jit(method.init_params)(jax.random.key(0), batch))
    rng = jax.random.key(5)
    vg = jax.jit(lambda p, s: method.value_and_grad(p, {}, batch, rng, s)[0][0])
    prepared = method.prepare_batch(batch, method.prepare_key(rng))
    assert prepared["keep_ids"].shape == (16, 4)                 # 25% of 16 patches kept
    masked = float(jax.jit(lambda p: method.loss(p, {}, prepared, rng, 0)[0])(params))
    unmasked = float(jax.jit(lambda p: method.loss(p, {}, prepared, rng, 0, masked=False)[0])(
        params))
    assert abs(masked - unmasked) > 1e-4
    for step in (0, 6):
        np.testing.assert_allclose(float(vg(params, jnp.int32(step))), masked, rtol=1e-5)
    for step in (7, 9):
        np.testing.assert_allclose(float(vg(params, jnp.int32(step))), unmasked, rtol=1e-5)


def test_unmasked_tuning_needs_the_total_step_count():
    cfg = ml_collections.ConfigDict(dict(model=tiny_dual_config(), method=dict(
        name="contrastive", mask_ratio=0.5, unmasked_tuning_steps=3)))
    with pytest.raises(ValueError, match="method.total_steps"):
        build_method(cfg, VOCAB, make_mesh())


# ---------------------------------------------------------------------- LiT / frozen pieces

def test_trainable_mask_freezes_the_paths_the_regexes_fullmatch():
    params = {"image_tower": {"a": np.zeros(2), "b": {"c": np.zeros(3)}},
              "text_tower": {"a": np.zeros(2)}, "logit_scale": np.zeros(())}
    mask = trainable_mask(params, ["image_tower/.*", "logit_scale"])
    assert mask == {"image_tower": {"a": False, "b": {"c": False}},
                    "text_tower": {"a": True}, "logit_scale": False}
    assert trainable_mask(params, ["image_tower/b/.*"])["image_tower"] == {"a": True,
                                                                          "b": {"c": False}}
    assert trainable_mask(params, [".*/a"]) == {"image_tower": {"a": False, "b": {"c": True}},
                                                "text_tower": {"a": False}, "logit_scale": True}
    assert trainable_mask(params, []) is None
    with pytest.raises(ValueError, match="config.frozen.*'image_towr/.*'"):
        trainable_mask(params, ["image_towr/.*"])
    with pytest.raises(ValueError, match="matches no parameter"):   # fullmatch, not search
        trainable_mask(params, ["image_tower"])


def test_splice_replaces_boxed_values_and_lists_mismatches():
    boxed = {"image_tower": {"w": nn.LogicallyPartitioned(jnp.zeros((2, 3)), ("embed", "mlp")),
                             "b": nn.LogicallyPartitioned(jnp.zeros(3), ("mlp",))},
             "text_tower": {"w": jnp.zeros(4)}}
    loaded = {"image_tower": {"w": np.ones((2, 3)), "b": np.full(3, 2.0)}}
    out = splice(boxed, loaded, ["image_tower"])
    assert isinstance(out["image_tower"]["w"], nn.LogicallyPartitioned)
    assert out["image_tower"]["w"].names == ("embed", "mlp")
    np.testing.assert_array_equal(out["image_tower"]["b"].value, [2.0, 2.0, 2.0])
    assert out["text_tower"] is boxed["text_tower"]
    bad = {"image_tower": {"w": np.ones((2, 5)), "extra": np.ones(1)}}
    with pytest.raises(WarmStartError) as info:
        splice(boxed, bad, ["image_tower"])
    msg = str(info.value)
    assert "shape differs:         w checkpoint (2, 5) vs model (2, 3)" in msg
    assert "missing in checkpoint: b (3,)" in msg and "not in model:          extra" in msg


def test_fixed_temperature_stays_fixed_while_the_rest_trains():
    from vlp_jax.parallel.sharding import DEFAULT_RULES
    from vlp_jax.train.optim import make_optimizer
    from vlp_jax.train.step import init_state, make_train_step, state_shardings
    mesh = make_mesh()
    cfg = ml_collections.ConfigDict(dict(model=tiny_dual_config(), method=dict(
        name="contrastive")))
    optim = ml_collections.ConfigDict(dict(lr=3e-3, warmup_steps=1, weight_decay=0.1))
    method = build_method(cfg, VOCAB, mesh)
    batch = _batch()
    tx, _, sh = state_shardings(method, lambda m: make_optimizer(optim, 10, m),
                                jax.random.key(0), batch, (), frozen=["logit_scale"])
    state = init_state(method, tx, jax.random.key(0), batch, sh)
    before = jax.device_get(state.params)
    step = make_train_step(method, tx, sh, frozen=["logit_scale"])
    for _ in range(3):
        state, _ = step(state, to_global_batch(batch, mesh))
    after = jax.device_get(state.params)
    assert after["logit_scale"] == before["logit_scale"] == np.float32(math.log(1 / 0.07))
    assert not np.array_equal(after["text_proj"]["kernel"], before["text_proj"]["kernel"])
