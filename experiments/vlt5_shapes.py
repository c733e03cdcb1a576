"""VL-T5 (Cho et al. 2021, "Unifying Vision-and-Language Tasks via Text Generation") on the
shapes world: one encoder-decoder trained on every task as text to text. Each training
example draws one task of `shapes_tasks.vlt5_examples` (captioning, VQA, grounding to a 3 x 3
region name, SNLI-VE); the encoder reads the image and the task input with its prefix
("vqa: what colour is the circle?"), the decoder generates the target ("red").

    vlp-jax train --config experiments/vlt5_shapes.py --workdir workdirs/vlt5_shapes

Arguments: smoke, steps, batch, res; decode.
Evaluation: `text_tasks` (exact-match accuracy per task and VQA answer type, VQA soft
accuracy, grounding, SNLI-VE, with chance levels; the `caption:` outputs scored as by the
captioning evaluator) on the test split.
"""
from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, decode="greedy")
    config = common.load("simvlm_shapes.py", arg, decode=arg.decode, prefix=0.0)
    config.data.text_tasks = "vlt5"
    n = 128 if arg.smoke else 512
    config.evals = common.evals(text_tasks=common.evaluator("text_tasks", n, batch_size=128))
    return config
