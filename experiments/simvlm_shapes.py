"""SimVLM (Wang et al. 2022) on the shapes world: PrefixLM with an encoder-decoder. The encoder
reads the image tokens and a random-length prefix of the caption bidirectionally; the decoder
predicts the rest (prefix length ~ U{0..n/2} words here, so plain captioning, p = 0, stays
frequent; see vlp_jax/objectives/captioning.py).

    vlp-jax train --config experiments/simvlm_shapes.py --workdir workdirs/simvlm_shapes

Arguments: smoke, steps, batch, res; decode; prefix (the fraction of words a prefix may take,
0.5; 0 = captioning only).
Evaluation: as git_shapes.py (captions generated with an empty prefix).
"""
import ml_collections

from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, decode="greedy", prefix=0.5)
    config = common.load("clip_shapes.py", arg)
    res = config.data.image_size
    width = 64 if arg.smoke else 96
    depth = 2 if arg.smoke else 3
    config.model = ml_collections.ConfigDict(dict(
        name="encoder_decoder", width=width, encoder_depth=depth, decoder_depth=depth,
        num_heads=4, mlp_dim=4 * width, context_length=config.data.get_ref("text_length"),
        dtype="float32", remat=False, image=common.vit(res, width, depth),
    ))
    config.method = common.captioning_method(arg.decode)
    config.method.prefix_fraction = float(arg.prefix)
    # lr 3e-3: at 1e-3 the smoke run (300 steps) learns the language before the image (GIT:
    # main-object colour 22.7% of captions vs 75.8% at 3e-3; chance 12.5%)
    config.optim.update(dict(lr=3e-3, weight_decay=0.01))
    config.evals = common.generative_evals(arg)
    return config
