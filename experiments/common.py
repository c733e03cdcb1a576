"""Pieces the experiment files share: their size arguments and the blocks of the shapes-world
recipes (data, towers, optimiser, training loop, mesh, evaluators).

An experiment file loads it by path (experiment files are not a package):

    from vlp_jax.config_args import sibling
    common = sibling(__file__)                     # this module

    def get_config(arg=None):
        arg = common.parse(arg, ratio=0.5)         # smoke, steps, batch, res + its own
        config = common.load("clip_shapes.py", arg)  # clip_shapes.py with the same sizes
        ...

The values here are the recipes' (clip_shapes.py's main job: 400 steps at batch 128 on 64 px,
`smoke`: 300 steps on 32 px and 2,048 training images); `vlp_jax.config_schema` declares what
each key means and the defaults of the keys left out.
"""
import os

import ml_collections
from ml_collections import config_dict

from vlp_jax.config_args import load_config, parse_arg
from vlp_jax.data.pipeline import default_data_config

HERE = os.path.dirname(os.path.abspath(__file__))
# The arguments every shapes recipe takes: smoke (tiny model and data), steps, batch, res
# (0 = the recipe's own).
SIZE_ARGS = dict(smoke=False, steps=0, batch=0, res=0)


def path(name: str) -> str:
    """experiments/<name>."""
    return os.path.join(HERE, name)


def parse(arg, **extra) -> ml_collections.ConfigDict:
    """'a=1,b' -> the size arguments (SIZE_ARGS) and the file's own `extra` (name=default)."""
    return parse_arg(arg, **dict(SIZE_ARGS, **extra))


def size_arg(arg, **more) -> str:
    """The argument string passing `arg`'s size arguments (and `more`) to another file."""
    values = {k: arg[k] for k in SIZE_ARGS}
    values.update(more)
    return ",".join(f"{k}={v}" for k, v in values.items())


def load(name: str, arg, **more) -> ml_collections.ConfigDict:
    """get_config of experiments/<name> with `arg`'s sizes (and the arguments `more`)."""
    return load_config(f"{path(name)}:{size_arg(arg, **more)}")


# ----------------------------------------------------------------------------- blocks

def steps(arg, smoke: int = 300, full: int = 400) -> int:
    return arg.steps or (smoke if arg.smoke else full)


def data(arg) -> ml_collections.ConfigDict:
    """The shapes world: 64 px and 20k training images; smoke 32 px, 2,048 / 256 / 256."""
    config = default_data_config()
    if arg.smoke:
        config.update(dict(image_size=32, num_train=2048, num_validation=256, num_test=256))
    if arg.res:
        config.image_size = arg.res
    return config


def vit(res: int, width: int, depth: int, num_heads: int = 4, pool: str = "cls") -> dict:
    """A ViT image tower on `res` px images with 8 x 8 patches (patch size res // 8)."""
    return dict(type="vit", patch_size=res // 8, width=width, depth=depth, num_heads=num_heads,
                mlp_dim=4 * width, image_size=res, pool=pool)


def text(width: int, depth: int, context_length, num_heads: int = 4, **extra) -> dict:
    """A text tower (`context_length` usually `config.data.get_ref('text_length')`)."""
    return dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=4 * width,
                context_length=context_length, **extra)


def adamw(num_steps: int, lr: float = 1e-3, weight_decay: float = 0.1
          ) -> ml_collections.ConfigDict:
    """AdamW (b2 0.98, eps 1e-6 as CLIP), 5% linear warmup, cosine to 0, clipping at 1."""
    return ml_collections.ConfigDict(dict(
        name="adamw", lr=lr, warmup_steps=max(num_steps // 20, 1), end_factor=0.0,
        b1=0.9, b2=0.98, eps=1e-6, weight_decay=weight_decay, grad_clip_norm=1.0))


def train(arg, num_steps: int, batch_size: int = 128) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        batch_size=arg.batch or batch_size, num_steps=num_steps, log_every=50,
        checkpoint_every=500, keep_checkpoints=2, nonfinite="skip"))


def mesh() -> ml_collections.ConfigDict:
    """Every device on the data axis."""
    return ml_collections.ConfigDict(dict(axes={"data": -1}))


def evaluator(kind: str, max_examples: int | None = None, batch_size: int = 256,
              split: str = "test", **extra) -> dict:
    """One `config.evals` entry; max_examples None (the whole split) stays a typed
    placeholder, so `--config.evals.<name>.max_examples=N` can set it."""
    n = config_dict.placeholder(int) if max_examples is None else max_examples
    return dict(type=kind, split=split, batch_size=batch_size, max_examples=n, **extra)


def evals(**entries) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(entries)


def captioning_method(decode: str = "greedy", **extra) -> ml_collections.ConfigDict:
    """The generative method (GIT, SimVLM, CoCa): captioning CE (+ ITC with a contrastive
    head), decoding `decode` up to the model's context length (beam 4, GNMT alpha 0.6)."""
    return ml_collections.ConfigDict(dict(
        name="captioning", label_smoothing=0.0, prefix_fraction=0.0,
        decoding=dict(mode=decode, beam_size=4, length_penalty=0.6), **extra))


def generative_evals(arg, **more) -> ml_collections.ConfigDict:
    """Captioning on the test split (128 images at smoke size, 512 otherwise) and zero-shot
    classification by prompt likelihood, plus `more` entries."""
    n = 128 if arg.smoke else 512
    return evals(captioning=evaluator("captioning", n, batch_size=128),
                 zeroshot_likelihood=evaluator("likelihood_zero_shot", n, batch_size=128),
                 **more)
