"""Declared fields of `config.model` (chosen by `model.name`) and of the image towers (chosen
by `model.image.type`); see `vlp_jax.config_schema`. The readers are models/registry.py and
each model's builder; a new model declares its fields here (or beside its builder with
`@declares("model", "<name>", ...)`, its module listed in config_schema.DECLARATION_MODULES).

`mlp_dim` defaults to 4 * width everywhere (the builders' fallback)."""
from vlp_jax.config_schema import Derived, Field, Select, Seq, Sub, declare
from vlp_jax.nn.attention import IMPLEMENTATIONS
from vlp_jax.nn.transformer import REMAT_POLICIES

FOUR_WIDTH = Derived(lambda section, root: 4 * section.width, "4 * width")

# Fields every model has (they apply to all of its towers).
declare(
    "model", None,
    module=Field(str, None, doc="a module to import first: it registers (and declares) the "
                               "model named by model.name"),
    dtype=Field(str, "float32", choices=("float32", "bfloat16"), doc="activation dtype"),
    remat=Field(bool, False, doc="rematerialise each transformer block"),
    remat_policy=Field(str, "nothing_saveable", choices=REMAT_POLICIES,
                       doc="jax.checkpoint_policies name used when remat=True"),
    scan_layers=Field(bool, False, doc="nn.scan over identical layers"),
    dropout_rate=Field(float, 0.0, doc="dropout in every block (needs a 'dropout' rng)"),
    attention_implementation=Field(str, None, choices=IMPLEMENTATIONS,
                                   doc="jax.nn.dot_product_attention's implementation "
                                       "(None: JAX chooses; on CPU the heads-major einsum "
                                       "path, the same function)"),
)

IMAGE_TOWER = Select("image_tower", key="type", default="vit")

declare(
    "image_tower", "vit",
    patch_size=Field(int), width=Field(int), depth=Field(int), num_heads=Field(int),
    mlp_dim=Field(int, FOUR_WIDTH), image_size=Field(int),
    pool=Field(str, "cls", doc="'cls' token or mean over patches"),
)
declare(
    "image_tower", "resnet",
    width=Field(int, doc="stem width (doubles per stage)"), stage_sizes=Field(Seq(int)),
    image_size=Field(int), block=Field(str, "basic"), stem_kernel=Field(int, 3),
    stem_stride=Field(int, 1), stem_pool=Field(bool, False), norm_groups=Field(int, 8),
    pool=Field(str, "gap", doc="'gap' (global average) or attention pooling"),
)

declare(
    "model", "dual_encoder",
    embed_dim=Field(int, doc="joint embedding width"),
    logit_scale_init=Field(float, 2.6592600369262695, doc="log(1 / temperature) at init"),
    logit_bias_init=Field(float, None, doc="SigLIP's learnable bias at init (None: no bias)"),
    image=IMAGE_TOWER,
    text=Sub("dual_encoder.text"),
)
declare(
    "dual_encoder.text", None,
    width=Field(int), depth=Field(int), num_heads=Field(int), mlp_dim=Field(int, FOUR_WIDTH),
    context_length=Field(int), causal=Field(bool, True),
    pool=Field(str, "eot", doc="'eot' (CLIP), 'cls' (bos) or 'mean'"),
)

declare(
    "model", "albef",
    embed_dim=Field(int, 256), fusion=Field(str, "cross_attention"),
    coattention_shared=Field(bool, False), itm_pool=Field(str, "text"),
    temperature_init=Field(float, 0.07),
    image=IMAGE_TOWER,
    text=Sub("albef.text"),
)
declare(
    "albef.text", None,
    width=Field(int), depth=Field(int, doc="unimodal text layers"),
    fusion_depth=Field(int, doc="fusion layers (>= 1)"), num_heads=Field(int),
    mlp_dim=Field(int, FOUR_WIDTH), context_length=Field(int),
)

declare(
    "model", "single_stream",
    width=Field(int), depth=Field(int), num_heads=Field(int), mlp_dim=Field(int, FOUR_WIDTH),
    image=Sub("single_stream.image"), text=Sub("single_stream.text"),
    image_cls=Field(bool, True), type_embeddings=Field(bool, True),
    num_mrc_classes=Field(int, 0, doc="k-means codebook size of the MRC heads (0: none)"),
)
declare("single_stream.image", None, image_size=Field(int), patch_size=Field(int))
declare("single_stream.text", None, context_length=Field(int))

# Generative models (vlp_jax/models/git.py, encoder_decoder.py, coca.py): a ViT image tower.
declare(
    "model", "git",
    width=Field(int), depth=Field(int, doc="decoder layers"), num_heads=Field(int),
    mlp_dim=Field(int, FOUR_WIDTH), context_length=Field(int, doc="longest caption, bos..eos"),
    image=IMAGE_TOWER,
)
declare(
    "model", "encoder_decoder",
    width=Field(int), encoder_depth=Field(int), decoder_depth=Field(int), num_heads=Field(int),
    mlp_dim=Field(int, FOUR_WIDTH), context_length=Field(int), image=IMAGE_TOWER,
)
declare(
    "model", "coca",
    embed_dim=Field(int, doc="contrastive embedding width"),
    num_queries=Field(int, 16, doc="attention-pooled image tokens the decoder reads (CoCa 256)"),
    logit_scale_init=Field(float, 2.6592600369262695, doc="log(1 / temperature) at init"),
    image=IMAGE_TOWER, text=Sub("coca.text"),
)
declare(
    "coca.text", None,
    width=Field(int), unimodal_depth=Field(int, doc="text-only decoder layers"),
    multimodal_depth=Field(int, doc="decoder layers with cross-attention to the image"),
    num_heads=Field(int), mlp_dim=Field(int, FOUR_WIDTH), context_length=Field(int),
)
