"""MaskCLIP (Dong et al. 2023) on the shapes world: CLIP + masked self-distillation.

Besides CLIP on full images, the student ViT encodes the patches left after removing a random
`mask` fraction of them, and a one-block decoder predicts the EMA teacher's (full-image) patch
tokens at the removed positions; on the text side, BERT-masked captions are encoded by the
student text tower and a one-block bidirectional predictor regresses the EMA teacher's
clean-caption tokens at the masked positions (`text=mlm`: predict the token ids through the
tied embedding instead).

    vlp-jax train --config experiments/maskclip_shapes.py --workdir workdirs/maskclip_shapes
    vlp-jax train --config experiments/maskclip_shapes.py:smoke --workdir /tmp/maskclip_smoke

Arguments: smoke, steps, batch, res (as clip_shapes); mask (image mask ratio, 0.75);
text ('distill' | 'mlm'); distance ('cosine' | 'smooth_l1'); momentum (EMA, 0.99).
"""
from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, mask=0.75, text="distill", distance="cosine",
                       momentum=0.99)
    config = common.load("clip_shapes.py", arg)
    config.method.update(dict(
        name="maskclip", mim_mask_ratio=arg.mask, mim_weight=1.0, text_weight=1.0,
        text_mask_prob=0.15, text_objective=arg.text, distance=arg.distance,
        normalize_target=True, decoder_depth=1, decoder_heads=config.model.image.num_heads,
        ema_momentum=arg.momentum))
    return config
