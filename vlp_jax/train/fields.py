"""Declared fields of the top level of an experiment config and of `train`, `optim`, `init`
(see `vlp_jax.config_schema` for the mechanism; the readers are train/trainer.py,
train/optim.py, train/warm_start.py and train/freeze.py)."""
from vlp_jax.config_schema import Each, Field, Map, ROOT, Select, Seq, Sub, declare, moved

declare(
    ROOT, None,
    seed=Field(int, 0, doc="parameter initialisation and data order"),
    data=Select("data", key="name", default="shapes"),
    model=Select("model", key="name", import_key="module"),
    method=Select("method", key="name", import_key="module"),
    optim=Select("optim", key="name", default="adamw"),
    train=Sub("train"),
    mesh=Sub("mesh", optional=True),
    evals=Each("evaluator", key="type"),
    init=Sub("init", optional=True),
    frozen=Field(Seq(str), [], doc="regexes fullmatched against '/'-joined parameter paths; "
                                   "matching parameters get no update"),
)

declare(
    "train", None,
    batch_size=Field(int, doc="global batch size (a multiple of the data-parallel size)"),
    num_steps=Field(int, doc="optimizer steps"),
    log_every=Field(int, 50, doc="steps between logged metric rows"),
    checkpoint_every=Field(int, 1000, doc="steps between checkpoints (the last step always)"),
    keep_checkpoints=Field(int, 2, doc="checkpoints kept on disk"),
    nonfinite=Field(str, "skip", choices=("skip", "stop", "ignore"),
                    doc="what a step with non-finite loss or gradients does"),
    preemption_check_every=Field(int, 10, doc="steps between cross-process preemption checks"),
    peak_flops=Field(float, None, doc="peak FLOP/s per device for the logged mfu (None: the "
                     "vendor table of vlp_jax.train.flops, or the measured CPU matmul peak)"),
)

declare(
    "optim", "adamw",
    lr=Field(float, doc="peak learning rate"),
    warmup_steps=Field(int, 0, doc="linear warmup from 0 (then cosine decay)"),
    end_factor=Field(float, 0.0, doc="final learning rate as a fraction of lr"),
    b1=Field(float, 0.9),
    b2=Field(float, 0.98),
    eps=Field(float, 1e-6),
    weight_decay=Field(float, 0.1, doc="decoupled weight decay on matrices (ndim >= 2)"),
    grad_clip_norm=Field(float, 1.0, doc="global-norm gradient clipping"),
)

declare(
    "init", None,
    workdir=Field(str, "", doc="an earlier run's WORKDIR; '' = no warm start"),
    step=Field(int, -1, doc="its checkpoint step (-1 = the latest)"),
    mapping=Field(Map(str), {}, doc="{destination param path prefix: source prefix}"),
)

moved("method.warm_start", "the top-level config.init (workdir, step, mapping={dest: src}), "
      "which works for every method; e.g. LiT: config.init.mapping = {'image_tower': "
      "'image_tower', 'image_proj': 'image_proj'}")
moved("method.frozen", "the top-level config.frozen (regexes over '/'-joined parameter "
      "paths), e.g. ['image_tower/.*', 'image_proj/.*']")
