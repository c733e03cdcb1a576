"""What the trainer needs from the data layer, behind one small object.

It builds the dataset if absent, loads its tokenizer, and hands out the train iterator,
evaluation sets and a tokenize function; methods and evaluators never import dataset code.
"""
from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from vlp_jax.data import pipeline, shapes_builder
from vlp_jax.data.types import EvalSet


class DataBridge:
    def __init__(self, data_config: ml_collections.ConfigDict):
        name = data_config.get("name", "shapes")
        if name != "shapes":
            raise ValueError(f"data.name {name!r} is unknown; valid: ['shapes']")
        self.config = data_config
        self.builder = shapes_builder.ensure_built(data_config)
        self.tokenizer = shapes_builder.load_tokenizer(data_config)

    def location(self) -> str:
        return str(self.builder.data_dir)

    def vocab(self) -> dict:
        t = self.tokenizer
        return dict(vocab_size=t.vocab_size, pad_id=t.pad_id, bos_id=t.bos_id, eos_id=t.eos_id,
                    mask_id=t.mask_id, word_start=t.word_start)

    def tokenize(self, texts) -> np.ndarray:
        """list[str] -> int32 [N, data.text_length]."""
        return self.tokenizer.encode(list(texts), self.config.text_length)

    def detokenize(self, ids) -> list[str]:
        """int [N, L] token rows -> N texts (up to eos; pad and bos skipped)."""
        return self.tokenizer.decode(np.asarray(ids).reshape(-1, np.shape(ids)[-1]))

    def example_shapes(self) -> dict:
        """Abstract batch-1 shapes of a train batch, {key: ShapeDtypeStruct}: initialisation
        traces these (never a global-size array): image float32 [1, S, S, 3], text int32
        [1, L]."""
        s, L = self.config.image_size, self.config.text_length
        return dict(image=jax.ShapeDtypeStruct((1, s, s, 3), np.float32),
                    text=jax.ShapeDtypeStruct((1, L), np.int32))

    def train_source(self):
        """The raw train records handed to the pipeline (a `__len__` / `__getitem__` object of
        dicts with image, captions, label); None means the dataset's own train split.
        Tests override it to inject bad records."""
        return None

    def train_iterator(self, global_batch_size: int, seed: int) -> pipeline.TrainIterator:
        """This process's batches; `issue_totals()` counts the bad records it met."""
        return pipeline.make_train_iterator(
            self.config, global_batch_size=global_batch_size, seed=seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            source=self.train_source())

    @functools.lru_cache(maxsize=8)
    def load_eval_set(self, split: str, max_examples: int | None = None) -> EvalSet:
        return pipeline.load_eval_set(self.config, split, max_examples)
