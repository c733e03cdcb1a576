"""The data layer: the shapes world, its TFDS builder, the tokenizer and the grain pipeline.

    from vlp_jax.data import default_data_config, ensure_built, make_train_iterator

Importing this package does not import TensorFlow; building a dataset does.
"""
from vlp_jax.data.pipeline import (TrainIterator, default_data_config, iterate_split,
                                   load_eval_set, make_train_iterator, tiny_data_config)
from vlp_jax.data.shapes_builder import ensure_built, get_builder, is_built, load_tokenizer
from vlp_jax.data.shapes_world import (CLASS_NAMES, PROMPT_TEMPLATES, SWAP_KINDS,
                                       canonical_caption, describe, describe_many,
                                       hard_negatives, render, sample_scene, scene_label,
                                       swap_attributes, swapped_caption)
from vlp_jax.data.tokenizer import Tokenizer, train_tokenizer
from vlp_jax.data.types import EvalSet

__all__ = [
    "CLASS_NAMES", "EvalSet", "PROMPT_TEMPLATES", "SWAP_KINDS", "Tokenizer", "TrainIterator",
    "canonical_caption", "default_data_config", "describe", "describe_many", "ensure_built",
    "get_builder", "hard_negatives", "is_built", "iterate_split", "load_eval_set",
    "load_tokenizer", "make_train_iterator", "render", "sample_scene", "scene_label",
    "swap_attributes", "swapped_caption", "tiny_data_config", "train_tokenizer",
]
