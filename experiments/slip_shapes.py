"""SLIP (Mu et al. 2022) on the shapes world: CLIP + SimCLR on two augmented views.

The CLIP model of `clip_shapes.py`, with the data pipeline returning a second augmented view of
every image (`data.two_views=True` -> batch['image2']). The loss adds SimCLR's NT-Xent
(temperature 0.1, gathered across devices) between the two views' projections through a 3-layer
MLP on the image tower's pooled output, weighted by `ssl_weight` (SLIP: 1.0).

    vlp-jax train --config experiments/slip_shapes.py --workdir workdirs/slip_shapes
    vlp-jax train --config experiments/slip_shapes.py:smoke --workdir /tmp/slip_smoke

Arguments: smoke, steps, batch, res (as clip_shapes); ssl_weight (1.0); ssl_temperature (0.1).
"""
from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, ssl_weight=1.0, ssl_temperature=0.1)
    config = common.load("clip_shapes.py", arg)
    config.data.two_views = True
    width = config.model.image.width
    config.method.update(dict(name="slip", ssl_weight=arg.ssl_weight,
                              ssl_temperature=arg.ssl_temperature,
                              ssl_mlp_dim=4 * width, ssl_emb_dim=width))
    return config
