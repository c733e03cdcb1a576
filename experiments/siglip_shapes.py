"""SigLIP (Zhai et al. 2023) on the shapes world: CLIP with the pairwise sigmoid loss.

Every image-text pair of the batch is an independent binary classification,
    L = -1/B sum_i sum_j log sigmoid(z_ij (t' <u_i, v_j> + b)),   z_ij = 1 if i = j else -1,
with t' = exp(t) learnable from t = log 10 and the bias b learnable from -10 (the paper's
initialisation, which offsets the B^2 - B negatives at the start). Everything else
(towers, data, optimiser, evaluators) is experiments/clip_shapes.py, so the two compare.

    vlp-jax train --config experiments/siglip_shapes.py --workdir workdirs/siglip_shapes
    vlp-jax train --config experiments/siglip_shapes.py:smoke --workdir /tmp/siglip_smoke

Arguments: smoke, steps, batch, res (as clip_shapes); ring (the ppermute ring loss).
"""
import math
from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, ring=False)
    config = common.load("clip_shapes.py", arg)
    config.model.logit_scale_init = math.log(10.0)
    config.model.logit_bias_init = -10.0
    config.method.loss = "sigmoid"
    config.method.ring = arg.ring
    return config
