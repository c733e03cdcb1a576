"""Ablation: FLIP's mask ratio (0 = CLIP, 0.5, 0.75) at a fixed number of steps.

Dropping patches cuts the image tower's cost to about (1 - ratio) of CLIP's; this sweep
measures what it costs in accuracy when the step count is held fixed (no unmasked tuning,
so the gap is the raw one; evaluation always sees whole images).

    vlp-jax sweep --config experiments/ablation_flip_ratio.py:smoke --workdir workdirs/abl_flip
    vlp-jax train --config experiments/ablation_flip_ratio.py:ratio=0.75 --workdir ...

Arguments: ratio; smoke, steps, batch, res (as clip_shapes).
"""
from vlp_jax.config_args import sibling

common = sibling(__file__)
VARIANTS = ["ratio=0", "ratio=0.5", "ratio=0.75"]


def get_config(arg=None):
    arg = common.parse(arg, ratio=0.0)
    return common.load("flip_shapes.py", arg, ratio=arg.ratio, tuning=0)
