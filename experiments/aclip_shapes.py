"""A-CLIP (Yang et al. 2023) on the shapes world: attentive token removal for CLIP.

An EMA teacher of the dual encoder scores every patch of the full image (its class token's
attention averaged over layers and heads, `score=attention`; or by the caption's similarity to
the patch tokens, `score=text`; or both, `score=attention_text`); the student encodes only the
`keep` highest-scored patches and trains CLIP on them. The full model adds a second augmented
view (`data.two_views=True`), SimCLR between the two masked views and online-to-EMA (BYOL-style)
distillation of the pooled features; `lite` keeps one view and CLIP only (A-CLIP-eff's spirit).

    vlp-jax train --config experiments/aclip_shapes.py --workdir workdirs/aclip_shapes
    vlp-jax train --config experiments/aclip_shapes.py:smoke,lite --workdir /tmp/aclip_smoke

Arguments: smoke, steps, batch, res (as clip_shapes); keep (fraction of patches kept, 0.5 as the
paper); score; momentum (EMA, 0.99); lite (one view, no auxiliary losses).
"""
from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, keep=0.5, score="attention", momentum=0.99, lite=False)
    config = common.load("clip_shapes.py", arg)
    width = config.model.image.width
    config.method.update(dict(
        name="aclip", keep_ratio=arg.keep, score=arg.score, ema_momentum=arg.momentum,
        views=1 if arg.lite else 2, ssl_weight=0.0 if arg.lite else 1.0,
        ssl_temperature=0.1, distill_weight=0.0 if arg.lite else 1.0,
        ssl_mlp_dim=4 * width, ssl_emb_dim=width))
    if not arg.lite:
        config.data.two_views = True
    return config
