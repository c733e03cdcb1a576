"""CLIP (Radford et al. 2021) on the embedded shapes world: the main job.

A ViT-S-ish/8 image tower on 64 px images and a 4-layer causal text transformer, trained
with the symmetric InfoNCE loss gathered across the data axis. Trains in a few minutes on
a 2-core CPU; zero-shot accuracy and retrieval recall are printed at the end.

    vlp-jax train --config experiments/clip_shapes.py --workdir workdirs/clip_shapes
    vlp-jax train --config experiments/clip_shapes.py:smoke --workdir /tmp/clip_smoke

Arguments (`:a=1,b`): smoke (tiny model and data, ~1 minute), steps, batch, res.
"""
import ml_collections
from ml_collections import config_dict

from vlp_jax.config_args import parse_arg
from vlp_jax.data.pipeline import default_data_config


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, steps=0, batch=0, res=0)
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = default_data_config()
    if arg.smoke:
        config.data.image_size = 32
        config.data.num_train = 2048
        config.data.num_validation = 256
        config.data.num_test = 256
    if arg.res:
        config.data.image_size = arg.res
    res = config.data.image_size
    width = 64 if arg.smoke else 96

    config.model = ml_collections.ConfigDict(dict(
        name="dual_encoder",
        embed_dim=width,
        logit_scale_init=2.6592600369262695,          # log(1 / 0.07), as CLIP
        dtype="float32",
        remat=False,
        image=dict(type="vit", patch_size=res // 8, width=width, depth=2 if arg.smoke else 3,
                   num_heads=4, mlp_dim=4 * width, image_size=res, pool="cls"),
        text=dict(width=width, depth=2 if arg.smoke else 3, num_heads=4, mlp_dim=4 * width,
                  context_length=config.data.get_ref("text_length"), causal=True, pool="eot"),
    ))
    config.method = ml_collections.ConfigDict(dict(name="contrastive", loss="softmax",
                                                   mask_ratio=0.0))
    steps = arg.steps or (300 if arg.smoke else 400)
    config.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, warmup_steps=max(steps // 20, 1), end_factor=0.0,
        b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, grad_clip_norm=1.0))
    config.train = ml_collections.ConfigDict(dict(
        batch_size=arg.batch or 128, num_steps=steps, log_every=50,
        checkpoint_every=500, keep_checkpoints=2, nonfinite="skip"))
    config.mesh = ml_collections.ConfigDict(dict(axes={"data": -1}))
    config.evals = ml_collections.ConfigDict(dict(
        zeroshot=dict(type="zero_shot", split="test", batch_size=256,
                      max_examples=config_dict.placeholder(int)),
        retrieval=dict(type="retrieval", split="test", batch_size=256,
                       max_examples=config_dict.placeholder(int)),
        compositional=dict(type="compositional", split="test", batch_size=256,
                           max_examples=config_dict.placeholder(int)),
    ))
    return config
