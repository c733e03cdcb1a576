"""ViLT (Kim et al. 2021) on the shapes world, and the single-stream family as variants.

One pre-LN transformer over [caption tokens ; image-class token ; linear patch embeddings]
(`model.name='single_stream'`), pretrained with MLM + ITM + 0.1 * WPA (ViLT's recipe; a random
other image replaces the true one for half of the pairs). Data, optimiser, training loop and
mesh are those of clip_shapes.py. Evaluation: retrieval ranked by the unimodal embeddings and
re-ranked by the ITM head (`itm_rerank_retrieval`, with the N x M cross-encoder cost
extrapolated).

    vlp-jax train --config experiments/vilt_shapes.py --workdir workdirs/vilt_shapes
    vlp-jax train --config experiments/vilt_shapes.py:smoke --workdir /tmp/vilt_smoke
    vlp-jax train --config experiments/vilt_shapes.py:variant=uniter --workdir workdirs/uniter

Arguments: smoke, steps, batch, res (as clip_shapes); variant:
  vilt        image class token, modality-type embeddings; MLM + ITM + 0.1 WPA summed each step
  uniter      no image class token; MLM / ITM(+WPA) / MRFR / MRC-kl, one task per step sampled
              with UNITER's mix ratios (mlm 8, itm 6, mrfr 4, mrc_kl 4), conditional masking,
              classes from a frozen 64-way k-means codebook of patch pixels
  visualbert  no image class token; MLM + ITM (sentence-image prediction) summed
  vlbert      no image class token; MLM + MRC (VL-BERT drops ITM; its ITM head stays untrained,
              so it has no retrieval evaluation)
and wwm (whole-word masking, used when the tokenizer provides a word-start table);
itm_warmup (fraction of train.num_steps trained on ITM (+WPA) alone before MLM and the region
tasks join; default 0.45 for the summed variants vilt / visualbert, 0 for uniter / vlbert;
0 = the paper's sum from step 0). The start step is computed from the `steps` argument: change
the run length with `:steps=N`, not `--config.train.num_steps`, or set method.start_steps.

Why the warm-up: ViLT initialises its transformer from an ImageNet ViT. From scratch at this
scale, with MLM summed in from step 0, ITM stays at chance (measured: itm_acc ~0.5 after
500-2000 steps at widths 32 and 64, with or without WPA, clipping or task sampling): ITM has a
long plateau (~700 steps at width 32 when trained alone) and MLM's larger gradients keep the
shared encoder from leaving it. Trained first alone, ITM leaves the plateau and keeps
improving after MLM joins (tests/test_fusion_methods.py, width 32, 1,800 steps: ITM 0.86 in
training and 86% on held-out pairs against a chance of 50%; MLM 0.16 against 1/256).
Reference settings (ViLT ViT-B/32, 200k steps at batch 4096, lr 1e-4) are out of reach on CPU;
this is the same recipe at toy scale.
"""
import ml_collections

from vlp_jax.config_args import sibling

common = sibling(__file__)

VARIANTS = {
    "vilt": dict(image_cls=True, objectives=("mlm", "itm", "wpa"), mixing="sum"),
    "uniter": dict(image_cls=False, objectives=("mlm", "itm", "wpa", "mrfr", "mrc_kl"),
                   mixing="sample", task_ratios=dict(mlm=8.0, itm=6.0, mrfr=4.0, mrc_kl=4.0)),
    "visualbert": dict(image_cls=False, objectives=("mlm", "itm"), mixing="sum"),
    "vlbert": dict(image_cls=False, objectives=("mlm", "mrc"), mixing="sum"),
}


def itm_first_start_steps(variant: dict, warmup: float, num_steps: int) -> dict:
    """method.start_steps of the ITM-first warm-up: every objective but ITM/WPA starts at
    round(warmup * num_steps). warmup < 0 picks the variant's default (0.45 when ITM and MLM
    are summed, else 0)."""
    objectives = variant["objectives"]
    if warmup < 0:
        warmup = 0.45 if variant["mixing"] == "sum" and "itm" in objectives else 0.0
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"itm_warmup must be in [0, 1), got {warmup}")
    if warmup and "itm" not in objectives:
        raise ValueError("itm_warmup needs 'itm' among the variant's objectives")
    start = int(round(warmup * num_steps))
    return {o: start for o in objectives if start and o not in ("itm", "wpa")}


def get_config(arg=None):
    arg = common.parse(arg, variant="vilt", wwm=False, itm_warmup=-1.0)
    if arg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {arg.variant!r}; valid: {sorted(VARIANTS)}")
    variant = dict(VARIANTS[arg.variant])
    config = common.load("clip_shapes.py", arg)
    res = config.data.image_size
    width = 64 if arg.smoke else 128
    config.model = ml_collections.ConfigDict(dict(
        name="single_stream", width=width, depth=2 if arg.smoke else 4, num_heads=4,
        mlp_dim=4 * width, dtype="float32", remat=False,
        image=dict(image_size=res, patch_size=res // 8),
        text=dict(context_length=config.data.get_ref("text_length")),
        image_cls=variant.pop("image_cls"), type_embeddings=True,
        num_mrc_classes=64 if {"mrc", "mrc_kl"} & set(variant["objectives"]) else 0,
    ))
    config.method = ml_collections.ConfigDict(dict(
        name="vilt", weights=dict(wpa=0.1), mlm_prob=0.15, mrm_prob=0.15,
        whole_word_masking=arg.wwm, mrc_temperature=1.0, kmeans_iterations=10,
        start_steps=itm_first_start_steps(variant, arg.itm_warmup, config.train.num_steps),
        **variant))
    config.optim.update(dict(lr=1e-3, weight_decay=0.01))     # ViLT: AdamW, wd 0.01
    n = 128 if arg.smoke else 512
    if arg.variant == "vlbert":
        config.evals = common.evals()
    else:
        config.evals = common.evals(
            rerank=common.evaluator("itm_rerank_retrieval", n, batch_size=128, k=16),
            compositional=common.evaluator("compositional", n, batch_size=128),
        )
    return config
