"""ViLBERT / LXMERT co-attention fusion on the shapes world, trained with ALBEF's objectives.

albef_shapes.py with `model.fusion='coattention'`: after the unimodal encoders, `fusion_depth`
co-attention blocks in which the text stream's queries attend to the image stream's keys and
values and vice versa, followed by self-attention and an MLP in each stream
(`vlp_jax.models.coattention`). Same heads and method (ITC + ITM + MLM with momentum
distillation), so the two fusion styles are compared on equal terms.

    vlp-jax train --config experiments/coattention_shapes.py --workdir workdirs/coattention
    vlp-jax train --config experiments/coattention_shapes.py:smoke,variant=lxmert --workdir /tmp/lx

Arguments: smoke, steps, batch, res (as clip_shapes); variant:
  vilbert   separate cross-attention weights per direction; ITM on the elementwise product of
            the fused text CLS and the fused image CLS (ViLBERT's alignment prediction)
  lxmert    one cross-attention module shared by both directions (LXMERT's cross-modality
            layer); ITM on the fused text CLS
"""
from vlp_jax.config_args import sibling

common = sibling(__file__)

VARIANTS = {"vilbert": dict(coattention_shared=False, itm_pool="product"),
            "lxmert": dict(coattention_shared=True, itm_pool="text")}


def get_config(arg=None):
    arg = common.parse(arg, variant="vilbert")
    if arg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {arg.variant!r}; valid: {sorted(VARIANTS)}")
    config = common.load("albef_shapes.py", arg, fusion="coattention")
    config.model.update(VARIANTS[arg.variant])
    return config
