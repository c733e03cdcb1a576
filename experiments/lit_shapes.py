"""LiT (Zhai et al. 2022, "locked-image tuning") on the shapes world.

The image tower and its projection come from an earlier CLIP run's checkpoint and stay
locked: only the text tower (and the temperature) trains, learning to read out the image
embedding space that already exists. The image parameters are copied by the trainer's
`config.init` (only the mapped subtrees are read from the checkpoint, shapes checked) and
frozen by `config.frozen` (regexes: the optimizer gives them no update and no moments, and
their gradient is not computed). The loss is CLIP's softmax InfoNCE.

    vlp-jax train --config experiments/clip_shapes.py --workdir workdirs/clip_shapes
    vlp-jax train --config experiments/lit_shapes.py --workdir workdirs/lit_shapes
    vlp-jax train --config experiments/lit_shapes.py:init=/path/to/clip_workdir,smoke ...

Arguments: smoke, steps, batch, res (as clip_shapes; the image tower must match the
checkpoint's, so pass the same smoke/res as that run); init (the CLIP run's WORKDIR,
default workdirs/clip_shapes); step (checkpoint step, -1 = latest).
"""
import ml_collections

from vlp_jax.config_args import sibling

common = sibling(__file__)
LOCKED = ["image_tower", "image_proj"]


def get_config(arg=None):
    arg = common.parse(arg, init="workdirs/clip_shapes", step=-1)
    config = common.load("clip_shapes.py", arg)
    config.init = ml_collections.ConfigDict(dict(
        workdir=arg.init, step=arg.step, mapping={name: name for name in LOCKED}))
    config.frozen = [f"{name}/.*" for name in LOCKED]
    return config
