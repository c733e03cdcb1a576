"""CLIP (Radford et al. 2021) on the embedded shapes world: the main job.

A ViT-S-ish/8 image tower on 64 px images and a 4-layer causal text transformer, trained
with the symmetric InfoNCE loss gathered across the data axis. Trains in a few minutes on
a 2-core CPU; zero-shot accuracy and retrieval recall are printed at the end.

    vlp-jax train --config experiments/clip_shapes.py --workdir workdirs/clip_shapes
    vlp-jax train --config experiments/clip_shapes.py:smoke --workdir /tmp/clip_smoke

Arguments (`:a=1,b`): smoke (tiny model and data, ~1 minute), steps, batch, res.
"""
import ml_collections

from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = common.data(arg)
    res = config.data.image_size
    width = 64 if arg.smoke else 96
    depth = 2 if arg.smoke else 3
    config.model = ml_collections.ConfigDict(dict(
        name="dual_encoder",
        embed_dim=width,
        logit_scale_init=2.6592600369262695,          # log(1 / 0.07), as CLIP
        dtype="float32",
        remat=False,
        image=common.vit(res, width, depth),
        text=common.text(width, depth, config.data.get_ref("text_length"), causal=True,
                         pool="eot"),
    ))
    config.method = ml_collections.ConfigDict(dict(name="contrastive", loss="softmax",
                                                   mask_ratio=0.0))
    steps = common.steps(arg)
    config.optim = common.adamw(steps)
    config.train = common.train(arg, steps)
    config.mesh = common.mesh()
    config.evals = common.evals(
        zeroshot=common.evaluator("zero_shot"),
        retrieval=common.evaluator("retrieval"),
        compositional=common.evaluator("compositional"),
    )
    return config
