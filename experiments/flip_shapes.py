"""FLIP (Li et al. 2023) on the shapes world: CLIP that encodes a random subset of patches.

Each step drops a random `ratio` of every image's patches before the ViT (argsort of uniform
noise, as MAE), so the image tower costs about (1 - ratio) of CLIP's and a batch of the same
compute can be larger. The loss is CLIP's softmax InfoNCE on the masked images. Optionally
the last `tuning` steps run unmasked ("unmasking tuning", which closes the gap between
masked training and unmasked evaluation); evaluation always sees whole images.

    vlp-jax train --config experiments/flip_shapes.py --workdir workdirs/flip_shapes
    vlp-jax train --config experiments/flip_shapes.py:ratio=0.75,tuning=100 --workdir ...

Arguments: smoke, steps, batch, res (as clip_shapes); ratio (0.5, the paper's main setting);
tuning (unmasked steps at the end; default 5% of the steps).
"""
from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, ratio=0.5, tuning=-1)
    config = common.load("clip_shapes.py", arg)
    config.method.mask_ratio = arg.ratio
    config.method.total_steps = config.train.get_ref("num_steps")
    tuning = arg.tuning if arg.tuning >= 0 else config.train.num_steps // 20
    config.method.unmasked_tuning_steps = tuning
    return config
