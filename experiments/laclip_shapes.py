"""LaCLIP (Fan et al. 2023) on the shapes world: CLIP trained on a random caption each step.

Every shapes image has several paraphrased captions; with `data.all_captions=True` the pipeline
ships all of them (plus any rewrites from `data.rewrites_path`, a JSON-lines file read by
`vlp_jax.data.rewrites`) and the loss draws one per example per step from the step's key.
`sampling=first` trains on the first caption only: the no-augmentation baseline.

    vlp-jax train --config experiments/laclip_shapes.py --workdir workdirs/laclip_shapes
    vlp-jax train --config experiments/laclip_shapes.py:smoke --workdir /tmp/laclip_smoke

Arguments: smoke, steps, batch, res (as clip_shapes); sampling ('uniform' | 'first');
rewrites (path of a JSON-lines rewrite file; '' = none).
"""
from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, sampling="uniform", rewrites="")
    config = common.load("clip_shapes.py", arg)
    config.data.all_captions = True
    if arg.rewrites:
        config.data.rewrites_path = arg.rewrites
    config.method.update(dict(name="laclip", sampling=arg.sampling, captions_key="captions"))
    return config
