"""GIT (Wang et al. 2022) on the shapes world: a ViT whose projected tokens open the sequence
of one transformer decoder (image bidirectional, text causal), trained by captioning alone.

    vlp-jax train --config experiments/git_shapes.py --workdir workdirs/git_shapes
    vlp-jax caption --config experiments/git_shapes.py --workdir workdirs/git_shapes --images a.png

Arguments: smoke, steps, batch, res (as clip_shapes); decode ('greedy', 'beam', 'sample').
Evaluation: captions generated for the test images (BLEU-4, CIDEr, attribute accuracy against
the scene) and zero-shot classification by the likelihood of each class prompt.
Optimiser: AdamW with GIT's weight decay 0.01, lr 3e-3 at this size (GIT: 1e-5 / 5e-5 for a
pretrained encoder).
"""
import ml_collections

from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, decode="greedy")
    config = common.load("clip_shapes.py", arg)
    res = config.data.image_size
    width = 64 if arg.smoke else 96
    depth = 2 if arg.smoke else 3
    config.model = ml_collections.ConfigDict(dict(
        name="git", width=width, depth=depth, num_heads=4, mlp_dim=4 * width,
        context_length=config.data.get_ref("text_length"), dtype="float32", remat=False,
        image=common.vit(res, width, depth),
    ))
    config.method = common.captioning_method(arg.decode)
    # lr 3e-3: at 1e-3 the smoke run (300 steps) learns the language before the image (GIT:
    # main-object colour 22.7% of captions vs 75.8% at 3e-3; chance 12.5%)
    config.optim.update(dict(lr=3e-3, weight_decay=0.01))
    config.evals = common.generative_evals(arg)
    return config
