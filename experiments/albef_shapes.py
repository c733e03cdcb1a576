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
import ml_collections

from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, queue=256, alpha=0.4, fusion="cross_attention")
    config = common.load("clip_shapes.py", arg)
    res = config.data.image_size
    width = 64 if arg.smoke else 128
    depth = 1 if arg.smoke else 2
    config.model = ml_collections.ConfigDict(dict(
        name="albef", embed_dim=256, fusion=arg.fusion, coattention_shared=False,
        itm_pool="text", temperature_init=0.07, dtype="float32", remat=False,
        image=common.vit(res, width, 2 * depth),
        text=common.text(width, depth, config.data.get_ref("text_length"), fusion_depth=depth),
    ))
    steps_per_epoch = max(1, config.data.num_train // config.train.batch_size)
    config.method = ml_collections.ConfigDict(dict(
        name="albef", queue_size=arg.queue, momentum=0.995, alpha=arg.alpha,
        alpha_ramp_steps=min(steps_per_epoch, config.train.num_steps), mlm_prob=0.15,
        whole_word_masking=False, weights=dict(itc=1.0, itm=1.0, mlm=1.0),
        temperature_range=(0.001, 0.5), itc_sharded=True))
    config.optim.update(dict(lr=1e-3, weight_decay=0.02))     # ALBEF: AdamW, wd 0.02
    n = 128 if arg.smoke else 512
    config.evals = common.evals(
        retrieval=common.evaluator("retrieval", n, batch_size=128),
        rerank=common.evaluator("itm_rerank_retrieval", n, batch_size=128, k=16),
        zeroshot=common.evaluator("zero_shot"),
        compositional=common.evaluator("compositional", n, batch_size=128),
        compositional_itc=common.evaluator("compositional", n, batch_size=128, use_itm=False),
    )
    return config
