"""Ablation: softmax (CLIP) vs sigmoid (SigLIP) contrastive loss, all else equal.

The sigmoid variant is experiments/siglip_shapes.py (scale from log 10, bias from -10); the
softmax variant is experiments/clip_shapes.py. Same towers, data, optimiser and steps.

    vlp-jax sweep --config experiments/ablation_loss.py:smoke --workdir workdirs/abl_loss

Arguments: loss ('softmax' or 'sigmoid'); smoke, steps, batch, res (as clip_shapes).
"""
import os

from vlp_jax.config_args import load_config, parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {"softmax": "clip_shapes.py", "sigmoid": "siglip_shapes.py"}
VARIANTS = ["loss=softmax", "loss=sigmoid"]


def get_config(arg=None):
    arg = parse_arg(arg, loss="softmax", smoke=False, steps=0, batch=0, res=0)
    if arg.loss not in FILES:
        raise ValueError(f"ablation_loss: loss={arg.loss!r} is unknown; valid: {sorted(FILES)}")
    return load_config(f"{os.path.join(HERE, FILES[arg.loss])}:smoke={arg.smoke},"
                       f"steps={arg.steps},batch={arg.batch},res={arg.res}")
