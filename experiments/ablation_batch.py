"""Ablation: contrastive batch size 64 vs 256 at the same number of examples seen.

A bigger batch gives every example more negatives (B - 1) but fewer optimizer steps for the
same data; steps = base_steps * 128 / batch. Batch 256 is computed with GradCache in
`micro` pieces (exact full-batch loss and gradient, the activation memory of 256 / micro),
the way a batch too big for the accelerator is trained.

    vlp-jax sweep --config experiments/ablation_batch.py:smoke --workdir workdirs/abl_batch

Arguments: batch (64 or 256; any multiple of the device count works); micro (GradCache
pieces above batch 64, default batch // 64); smoke, res (as clip_shapes); steps (the
steps at batch 128, default clip_shapes').
"""
from vlp_jax.config_args import sibling

common = sibling(__file__)
VARIANTS = ["batch=64", "batch=256"]


def get_config(arg=None):
    arg = common.parse(arg, batch=64, micro=0)
    config = common.load("clip_shapes.py", arg, batch=0)   # clip_shapes' own batch (128)
    base_steps = config.train.num_steps              # at clip_shapes' batch of 128
    config.train.batch_size = arg.batch
    config.train.num_steps = max(1, base_steps * 128 // arg.batch)
    config.optim.warmup_steps = max(config.train.num_steps // 20, 1)
    micro = arg.micro or max(1, arg.batch // 64)
    if micro > 1:
        config.method.accumulation = "grad_cache"
        config.method.micro_batches = micro
    return config
