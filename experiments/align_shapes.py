"""ALIGN (Jia et al. 2021) on the shapes world: a CNN image tower and a BERT-style text tower.

ALIGN's recipe is CLIP's dual encoder with different towers: a convolutional image encoder
with global average pooling (EfficientNet in the paper; here a GroupNorm + weight-standardised
pre-activation ResNet, `vlp_jax/models/resnet.py`, so no batch statistics are kept) and a
bidirectional text transformer pooled at its [CLS] (bos) token. The loss is the normalised
softmax (InfoNCE) over cosine similarities with a learnable temperature,
    L = -1/2B sum_i [log softmax_j(s_ij)_i + log softmax_j(s_ji)_i],  s_ij = <u_i, v_j> / T.
(The paper starts T at 1.0 and adds 0.1 label smoothing; over a few hundred CPU steps
T = 1 learns too slowly, so `temp=1.0` is an argument and the default starts at CLIP's 0.07.)
Data, optimiser and evaluators are experiments/clip_shapes.py's, so the image tower is the
only change: the tower is swapped by config (`model.image.type='resnet'`).

    vlp-jax train --config experiments/align_shapes.py --workdir workdirs/align_shapes
    vlp-jax train --config experiments/align_shapes.py:smoke --workdir /tmp/align_smoke

Arguments: smoke, steps, batch, res (as clip_shapes); temp (initial temperature, 0.07).
"""
import math
from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, temp=0.07)
    config = common.load("clip_shapes.py", arg)
    res = config.data.image_size
    width = config.model.text.width
    config.model.logit_scale_init = math.log(1.0 / arg.temp)
    config.model.image = dict(
        type="resnet", width=16 if arg.smoke else 32, image_size=res,
        stage_sizes=[1, 1, 1] if arg.smoke else [2, 2, 2], block="basic",
        stem_kernel=3, stem_stride=2 if res >= 64 else 1, stem_pool=False,
        norm_groups=8, pool="gap")
    config.model.text = common.text(width, config.model.text.depth,
                                    config.data.get_ref("text_length"), causal=False, pool="cls")
    config.method.loss = "softmax"
    return config
