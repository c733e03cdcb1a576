"""Declared fields of `config.data` (see `vlp_jax.config_schema`; the readers are
data/pipeline.py, data/shapes_builder.py, data/preprocess.py and train/data_bridge.py)."""
import dataclasses

from vlp_jax.config_schema import Field, declare
from vlp_jax.data.preprocess import AugmentConfig

declare(
    "data", "shapes",
    data_dir=Field(str, None, doc="TFDS data dir; None: $VLP_JAX_DATA_DIR, else "
                                   "~/.cache/vlp_jax/tensorflow_datasets"),
    image_size=Field(int, 64, doc="image side in pixels"),
    num_train=Field(int, 20000),
    num_validation=Field(int, 1000),
    num_test=Field(int, 1000),
    captions_per_image=Field(int, 5, doc="captions stored per image"),
    seed=Field(int, 0, doc="seed of the generated world (the shuffle seed is the trainer's)"),
    vocab_size=Field(int, 256, doc="sentencepiece vocabulary upper bound"),
    text_length=Field(int, 28, doc="token ids per caption incl. bos/eos (the longest caption "
                                       "has 27)"),
    augment=Field(bool, True, doc="crop-and-resize + brightness/contrast jitter "
                                    "(fine control: augment_*)"),
    two_views=Field(bool, False, doc="a second augmented view as batch['image2']"),
    all_captions=Field(bool, False, doc="ship every caption as batch['captions']"),
    num_caption_candidates=Field(int, 0, doc="K of batch['captions']; 0: captions_per_image, "
                                                "doubled when rewrites are given"),
    rewrites_path=Field(str, None, doc="JSON-lines caption rewrites (LaCLIP)"),
    worker_count=Field(int, 0, doc="grain worker processes (0: in-process)"),
    read_threads=Field(int, 2, doc="threads reading ahead in this process"),
    prefetch_batches=Field(int, 2, doc="batches read ahead"),
    **{f"augment_{f.name}": Field(float, f.default, doc=f"AugmentConfig.{f.name}")
       for f in dataclasses.fields(AugmentConfig)},
)
