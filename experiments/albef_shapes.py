"""ALBEF (Li et al. 2021) on the shapes world: align before fuse, with momentum distillation.

A ViT image encoder, a bidirectional text encoder (the first `depth` layers of the BERT) and a
fusion encoder (the remaining `fusion_depth` layers, each with cross-attention to the image
tokens). ITC with 256-d projections over the batch and feature queues of the momentum model's
features, ITM with hard negatives sampled from the ITC similarities, MLM distilled from the
momentum model (alpha 0.4, ramped over the first epoch), momentum 0.995, learnable temperature
0.07 clamped to [0.001, 0.5] (REFERENCE.md). The queue is 256 here (65536 in ALBEF) so it is a
few batches deep, as in the original's 65536 / 512. Data, optimiser and mesh as clip_shapes.py.

    vlp-jax train --config experiments/albef_shapes.py --workdir workdirs/albef_shapes
    vlp-jax train --config experiments/albef_shapes.py:smoke --workdir /tmp/albef_smoke

Arguments: smoke, steps, batch, res (as clip_shapes); queue (256); alpha (0.4); fusion
('cross_attention', or 'coattention' -- see coattention_shapes.py).
Evaluation: ITC retrieval, ITC top-16 re-ranked by the ITM head, zero-shot classification,
compositional swaps scored by the ITM head and by ITC.
"""
import os

import ml_collections
from ml_collections import config_dict

from vlp_jax.config_args import load_config, parse_arg

CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_shapes.py")


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, steps=0, batch=0, res=0, queue=256, alpha=0.4,
                    fusion="cross_attention")
    config = load_config(f"{CLIP}:smoke={arg.smoke},steps={arg.steps},batch={arg.batch},"
                         f"res={arg.res}")
    res = config.data.image_size
    width = 64 if arg.smoke else 128
    depth = 1 if arg.smoke else 2
    config.model = ml_collections.ConfigDict(dict(
        name="albef", embed_dim=256, fusion=arg.fusion, coattention_shared=False,
        itm_pool="text", temperature_init=0.07, dtype="float32", remat=False,
        image=dict(type="vit", patch_size=res // 8, width=width, depth=2 * depth, num_heads=4,
                   mlp_dim=4 * width, image_size=res, pool="cls"),
        text=dict(width=width, depth=depth, fusion_depth=depth, num_heads=4, mlp_dim=4 * width,
                  context_length=config.data.get_ref("text_length")),
    ))
    steps_per_epoch = max(1, config.data.num_train // config.train.batch_size)
    config.method = ml_collections.ConfigDict(dict(
        name="albef", queue_size=arg.queue, momentum=0.995, alpha=arg.alpha,
        alpha_ramp_steps=min(steps_per_epoch, config.train.num_steps), mlm_prob=0.15,
        whole_word_masking=False, weights=dict(itc=1.0, itm=1.0, mlm=1.0),
        temperature_range=(0.001, 0.5), itc_sharded=True))
    config.optim.update(dict(lr=1e-3, weight_decay=0.02))     # ALBEF: AdamW, wd 0.02
    n = 128 if arg.smoke else 512
    config.evals = ml_collections.ConfigDict(dict(
        retrieval=dict(type="retrieval", split="test", max_examples=n, batch_size=128),
        rerank=dict(type="itm_rerank_retrieval", split="test", max_examples=n, batch_size=128,
                    k=16),
        zeroshot=dict(type="zero_shot", split="test", batch_size=256,
                      max_examples=config_dict.placeholder(int)),
        compositional=dict(type="compositional", split="test", max_examples=n, batch_size=128),
        compositional_itc=dict(type="compositional", split="test", max_examples=n,
                               batch_size=128, use_itm=False),
    ))
    return config
