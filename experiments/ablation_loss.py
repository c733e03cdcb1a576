"""Ablation: softmax (CLIP) vs sigmoid (SigLIP) contrastive loss, all else equal.

The sigmoid variant is experiments/siglip_shapes.py (scale from log 10, bias from -10); the
softmax variant is experiments/clip_shapes.py. Same towers, data, optimiser and steps.

    vlp-jax sweep --config experiments/ablation_loss.py:smoke --workdir workdirs/abl_loss

Arguments: loss ('softmax' or 'sigmoid'); smoke, steps, batch, res (as clip_shapes).
"""
from vlp_jax.config_args import sibling

common = sibling(__file__)
FILES = {"softmax": "clip_shapes.py", "sigmoid": "siglip_shapes.py"}
VARIANTS = ["loss=softmax", "loss=sigmoid"]


def get_config(arg=None):
    arg = common.parse(arg, loss="softmax")
    if arg.loss not in FILES:
        raise ValueError(f"ablation_loss: loss={arg.loss!r} is unknown; valid: {sorted(FILES)}")
    return common.load(FILES[arg.loss], arg)
