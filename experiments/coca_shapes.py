"""CoCa (Yu et al. 2022) on the shapes world: contrastive captioner. A ViT with attentional
pooling (1 query for the contrastive embedding, N for the decoder), a unimodal causal text
decoder whose appended cls output is the text embedding, and a multimodal decoder that
cross-attends to the pooled image tokens. Loss = ITC gathered across devices + 2 x captioning
CE (CoCa's lambda_Con = 1, lambda_Cap = 2).

    vlp-jax train --config experiments/coca_shapes.py --workdir workdirs/coca_shapes

Arguments: smoke, steps, batch, res; decode; queries (16; CoCa 256); smoothing (label
smoothing of the captioning CE, 0.0; CoCa 0.1).
Evaluation: captioning and likelihood zero-shot as git_shapes.py, plus the contrastive head
through the CLIP evaluators (zero-shot, retrieval), comparable with clip_shapes.py, and ITC's
top 16 re-ranked by caption likelihood (`itm_rerank_retrieval` with `score_pairs` = the mean
log-likelihood of the caption).
"""
import ml_collections

from vlp_jax.config_args import sibling

common = sibling(__file__)


def get_config(arg=None):
    arg = common.parse(arg, decode="greedy", queries=16, smoothing=0.0)
    config = common.load("clip_shapes.py", arg)
    res = config.data.image_size
    width = 64 if arg.smoke else 96
    depth = 2 if arg.smoke else 3
    config.model = ml_collections.ConfigDict(dict(
        name="coca", embed_dim=width, num_queries=arg.queries,
        logit_scale_init=2.6592600369262695, dtype="float32", remat=False,
        image=common.vit(res, width, depth),
        text=dict(width=width, unimodal_depth=max(1, depth // 2),
                  multimodal_depth=depth - max(1, depth // 2) or 1, num_heads=4,
                  mlp_dim=4 * width, context_length=config.data.get_ref("text_length")),
    ))
    config.method = common.captioning_method(arg.decode, objectives=dict(
        itc=dict(weight=1.0), caption=dict(weight=2.0)))
    config.method.label_smoothing = float(arg.smoothing)
    config.evals = common.generative_evals(
        arg, zeroshot=common.evaluator("zero_shot"), retrieval=common.evaluator("retrieval"),
        rerank=common.evaluator("itm_rerank_retrieval", 128 if arg.smoke else 512,
                                batch_size=128, k=16))
    return config
