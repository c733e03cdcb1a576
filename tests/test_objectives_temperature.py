"""Temperature clamps act on the parameter after the optimizer step (`Method.project_params`),
as open_clip (`logit_scale.clamp_(0, ln 100)`) and ALBEF (`temp.clamp_(0.001, 0.5)`) do, not in
the forward pass: past the bound the parameter still gets a gradient and is pulled back to the
bound, instead of freezing with a zero gradient."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp_jax.methods.registry import build_method
from vlp_jax.parallel.mesh import make_mesh
from tests.helpers import VOCAB, paired_batch, step_training_only, tiny_dual_config


def test_clip_logit_scale_above_the_bound_keeps_its_gradient_and_is_clamped_after_the_step():
    mesh = make_mesh(ml_collections.ConfigDict(dict(num_devices=1)))
    cfg = ml_collections.ConfigDict(dict(model=tiny_dual_config(),
                                         method=dict(name="contrastive")))
    cfg.model.logit_scale_init = 5.0                       # > ln 100 = 4.605
    method = build_method(cfg, VOCAB, mesh)
    batch = {k: np.asarray(v, np.float32) if k == "image" else v
             for k, v in paired_batch(n=8).items()}
    grad, before, after = step_training_only(method, batch, "logit_scale",
                                             dict(lr=1e-3, warmup_steps=0, weight_decay=0.0))
    assert float(before["logit_scale"]) == 5.0
    assert grad > 1e-6                                      # a forward clamp gives exactly 0
    np.testing.assert_allclose(float(after["logit_scale"]), math.log(100.0), rtol=1e-6)
    assert method.project_params({"logit_scale": jnp.float32(-1.0)})["logit_scale"] == 0.0

