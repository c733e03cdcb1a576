"""Every model on the shared stack: scan_layers gives the loop's outputs with re-stacked
weights; builders read the stack options; the registry takes decorator registrations."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.models.registry import build_model, register_model
from vlp_jax.nn.transformer import stack_layers
from tests.helpers import VOCAB, albef_cfg, single_cfg, tiny_dual_config

IMAGES = jax.random.uniform(jax.random.key(7), (2, 16, 16, 3))
TOKENS = jnp.array([[2, 7, 8, 9, 3, 0, 0, 0], [2, 5, 3, 0, 0, 0, 0, 0]], jnp.int32)


def _dual():
    cfg = tiny_dual_config()
    cfg.text.context_length = 8
    cfg.image.depth = cfg.text.depth = 2
    return cfg


CONFIGS = {"dual_encoder": _dual, "albef": albef_cfg,
           "coattention": lambda: albef_cfg("coattention"), "single_stream": single_cfg}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scanned_model_equals_loop_with_restacked_weights(name):
    cfg = CONFIGS[name]()
    loop = build_model(cfg, VOCAB)
    params = jax.jit(loop.init)(jax.random.key(0), IMAGES, TOKENS)["params"]
    cfg.scan_layers = True
    scan = build_model(cfg, VOCAB)
    stacked = stack_layers(params)
    abstract = jax.eval_shape(scan.init, jax.random.key(0), IMAGES, TOKENS)["params"]
    assert (jax.tree.map(jnp.shape, stacked)
            == jax.tree.map(jnp.shape, __import__("flax").linen.meta.unbox(abstract)))
    a = jax.jit(loop.apply)({"params": params}, IMAGES, TOKENS)
    b = jax.jit(scan.apply)({"params": stacked}, IMAGES, TOKENS)
    for key in a:
        # float32, width 32, <= 4 blocks: only the accumulation order differs
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_builders_read_the_stack_options():
    cfg = albef_cfg(attention_implementation="xla", remat=True, remat_policy="dots_saveable")
    model = build_model(cfg, VOCAB)
    assert model.attention_implementation == "xla" and model.remat_policy == "dots_saveable"
    assert model.image_tower.attention_implementation == "xla" and model.image_tower.remat
    with pytest.raises(ValueError, match="attention_implementation"):
        build_model(single_cfg(attention_implementation="flash"), VOCAB)
    with pytest.raises(ValueError, match="remat_policy"):
        build_model(albef_cfg(remat_policy="dots"), VOCAB)
    bad = _dual()
    bad.dropout_rate = 0.1
    with pytest.raises(ValueError, match="dropout"):
        build_model(bad, VOCAB)


def test_decorator_registration_and_unknown_names():
    @register_model("test_only_tiny")
    def build(cfg, vocab):
        return build_model(single_cfg(), vocab)

    model = build_model(ml_collections.ConfigDict(dict(name="test_only_tiny")), VOCAB)
    assert type(model).__name__ == "SingleStreamTransformer"
    with pytest.raises(ValueError, match="valid:.*albef"):
        build_model(ml_collections.ConfigDict(dict(name="nope")), VOCAB)


def test_registry_imports_no_model_module():
    code = ("import sys, vlp_jax.models.registry as r; "
            "print(sorted(m for m in sys.modules if m.startswith('vlp_jax.models.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"JAX_PLATFORMS": "cpu", **__import__("os").environ})
    assert out.stdout.strip() == "['vlp_jax.models.registry']", out.stdout
