"""Ablation: learnable vs fixed softmax temperature (CLIP's loss, T starting at 0.07).

`temp=fixed` freezes `logit_scale` at its initial value through the optimizer's trainable
mask (`config.frozen=['logit_scale']`); `temp=learnable` is experiments/clip_shapes.py.

    vlp-jax sweep --config experiments/ablation_temperature.py:smoke --workdir workdirs/abl_temp

Arguments: temp ('learnable' or 'fixed'); init (initial temperature, 0.07); smoke, steps,
batch, res (as clip_shapes).
"""
import math
from vlp_jax.config_args import sibling

common = sibling(__file__)
VARIANTS = ["temp=learnable", "temp=fixed"]
MODES = ("learnable", "fixed")


def get_config(arg=None):
    arg = common.parse(arg, temp="learnable", init=0.07)
    if arg.temp not in MODES:
        raise ValueError(f"ablation_temperature: temp={arg.temp!r} is unknown; valid: {MODES}")
    config = common.load("clip_shapes.py", arg)
    config.model.logit_scale_init = math.log(1.0 / arg.init)
    config.frozen = ["logit_scale"] if arg.temp == "fixed" else []
    return config
