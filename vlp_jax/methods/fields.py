"""Declared fields of `config.method`, chosen by `method.name` (see `vlp_jax.config_schema`).
The readers are the method classes in this package; `extends` mirrors their class hierarchy
(SLIP, LaCLIP, A-CLIP and MaskCLIP are ContrastiveMethods)."""
from vlp_jax.config_schema import OMIT, Each, Field, Map, Seq, Sub, declare

# `method.objectives` of the methods built on a Combiner: {term name: schedule overrides}
# applied to the method's own terms (objectives.core.override_terms checks the names); nothing
# is filled in, an absent field keeps the method's value.
declare(
    "term_schedule", None,
    weight=Field(float, OMIT), start_step=Field(int, OMIT, doc="step the term's weight starts"),
    ramp_steps=Field(int, OMIT, doc="linear ramp of the weight after start_step"),
    task=Field(str, OMIT, doc="UNITER-style task the term belongs to"),
)
OBJECTIVES = Each("term_schedule", key=None)

declare(
    "method", None,
    module=Field(str, None, doc="a module to import first: it registers (and declares) the "
                 "method named by method.name (vlp_jax.methods.registry)"),
)
declare(
    "method", "contrastive",
    loss=Field(str, "softmax", choices=("softmax", "sigmoid"), doc="'softmax' (CLIP, ALIGN) or 'sigmoid' (SigLIP)"),
    mask_ratio=Field(float, 0.0, doc="FLIP: fraction of patches dropped"),
    accumulation=Field(str, "none", choices=("none", "grad_cache", "plain"), doc="'none', 'grad_cache' or 'plain'"),
    micro_batches=Field(int, 1),
    chunk_size=Field(int, 0, doc="> 0: chunked softmax loss with column chunks of this size"),
    ring=Field(bool, False, doc="sigmoid loss through the ppermute ring"),
    unmasked_tuning_steps=Field(int, 0, doc="FLIP: the last N of total_steps unmasked"),
    total_steps=Field(int, 0, doc="linked to train.num_steps by the experiment file"),
    objectives=OBJECTIVES,
)
declare(
    "method", "slip", extends="contrastive",
    ssl_weight=Field(float, 1.0), ssl_temperature=Field(float, 0.1),
    ssl_mlp_dim=Field(int, 256), ssl_emb_dim=Field(int, 64),
)
declare(
    "method", "laclip", extends="contrastive",
    sampling=Field(str, "uniform", choices=("uniform", "first"), doc="'uniform' caption per step, or 'first'"),
    captions_key=Field(str, "captions"),
)
declare(
    "method", "aclip", extends="contrastive",
    keep_ratio=Field(float, 0.5),
    score=Field(str, "attention", choices=("attention", "text", "attention_text")),
    views=Field(int, 1, choices=(1, 2)),
    ssl_weight=Field(float, 0.0), distill_weight=Field(float, 0.0),
    ssl_mlp_dim=Field(int, 256), ssl_emb_dim=Field(int, 64), ssl_temperature=Field(float, 0.1),
    ema_momentum=Field(float, 0.99),
)
declare(
    "method", "maskclip", extends="contrastive",
    mim_mask_ratio=Field(float, 0.75), mim_weight=Field(float, 1.0),
    text_weight=Field(float, 1.0), text_mask_prob=Field(float, 0.15),
    text_objective=Field(str, "distill", choices=("distill", "mlm"), doc="'distill' or 'mlm'"),
    distance=Field(str, "cosine", choices=("cosine", "smooth_l1"), doc="'cosine' or 'smooth_l1'"),
    normalize_target=Field(bool, True), decoder_depth=Field(int, 1), decoder_heads=Field(int, 2),
    decoder_width=Field(int, OMIT, doc="default: the image tower's width"),
    ema_momentum=Field(float, 0.99),
)
declare(
    "method", "albef",
    queue_size=Field(int, 65536), momentum=Field(float, 0.995), alpha=Field(float, 0.4),
    alpha_ramp_steps=Field(int, 0), mlm_prob=Field(float, 0.15),
    whole_word_masking=Field(bool, False), weights=Field(Map(float), {}),
    temperature_range=Field(Seq(float), (0.001, 0.5)), itc_sharded=Field(bool, True),
    objectives=OBJECTIVES,
    exclude_duplicate_negatives=Field(bool, False, doc="True: captions identical to the positive "
                                      "are never ITM negatives (not in ALBEF/LAVIS)"),
)
declare(
    "method", "vilt",
    objectives=Field(Seq(str), ("mlm", "itm", "wpa")),
    mixing=Field(str, "sum", choices=("sum", "sample"), doc="'sum' or 'sample' (UNITER's task sampling)"),
    weights=Field(Map(float), {}), start_steps=Field(Map(int), {}),
    task_ratios=Field(Map(float), {}), mlm_prob=Field(float, 0.15), mrm_prob=Field(float, 0.15),
    whole_word_masking=Field(bool, False), mrc_temperature=Field(float, 1.0),
    kmeans_iterations=Field(int, 10),
)
declare(
    "method", "captioning",
    objectives=OBJECTIVES,
    label_smoothing=Field(float, 0.0, doc="of the captioning CE (CoCa 0.1)"),
    prefix_fraction=Field(float, 0.0, doc="SimVLM PrefixLM: prefix length ~ U{0..f*n} words "
                          "(0: plain captioning)"),
    loss=Field(str, "softmax", choices=("softmax", "sigmoid"), doc="ITC loss (CoCa)"),
    decoding=Sub("decoding"),
)
declare(
    "decoding", None,
    mode=Field(str, "greedy", choices=("greedy", "beam", "sample")),
    max_length=Field(int, OMIT, doc="default: the model's context length"),
    beam_size=Field(int, 4), length_penalty=Field(float, 0.6, doc="GNMT alpha"),
    temperature=Field(float, 1.0), top_k=Field(int, 0), seed=Field(int, 0),
)
