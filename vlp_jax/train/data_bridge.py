"""What the trainer needs from the data layer, behind one small object.

It builds the dataset if absent, loads its tokenizer, and hands out the train iterator,
evaluation sets and a tokenize function; methods and evaluators never import dataset code.

`data.name` chooses the data: 'shapes' (the procedural world, built as a TFDS dataset), a
source reading files (`vlp_jax.data.sources.SOURCES`: coco_json, csv, image_folder) or
'webdataset', tar shards streamed by `vlp_jax.data.webdataset_source` (train_path / val_path /
test_path are shard patterns; its tokenizer is trained on the first data.tokenizer_sample
captions of the training shards). For a file source, splits map to files: 'train' -> data.train_path, 'validation' / 'test' ->
data.val_path / data.test_path (else the train file's split of that name, Karpathy layout),
'zeroshot' -> data.zeroshot_path (an image folder). Its tokenizer is data.tokenizer_path, else
the shapes world's (data.tokenizer='shapes'), else sentencepiece trained on the training
captions and the zero-shot prompts, cached under the shapes builder's data dir.
'array_record' reads a directory written by `vlp-jax data build` (data.path; its manifest's
tokenizer) and 'tfds' a prepared TFDS dataset (data.tfds_name): both are record datasets
(`RECORD_DATASETS`) that hand the bridge their tokenizer, train records and eval sets.
"""
from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np

from vlp_jax.config_schema import resolve_part
from vlp_jax.data import (array_record_source, photo, pipeline, shapes_builder, sources,
                          task_fields, tfds_source, webdataset_source)
from vlp_jax.data.tokenizer import Tokenizer
from vlp_jax.data.types import EvalSet

_EVAL_PATHS = {"validation": "val_path", "test": "test_path"}
RECORD_DATASETS = {"array_record": array_record_source.ArrayRecordDataset,
                   "tfds": tfds_source.TfdsDataset}


class DataBridge:
    def __init__(self, data_config: ml_collections.ConfigDict):
        name = data_config.get("name", "shapes")
        valid = ["shapes", "webdataset", *RECORD_DATASETS] + sorted(sources.SOURCES)
        if name not in valid:
            raise ValueError(f"data.name {name!r} is unknown; valid: {valid}")
        self.name, self.records = name, None
        if name == "shapes":
            self.config = data_config
            self.builder = shapes_builder.ensure_built(data_config)
            self.tokenizer = shapes_builder.load_tokenizer(data_config)
            return
        self.config = resolve_part("data", data_config)
        self.builder = None
        self.photos = photo.photo_transform(self.config)
        if name in RECORD_DATASETS:
            self.train_listing = None
            self.records = RECORD_DATASETS[name](self.config)
            self.tokenizer = self.records.tokenizer()
            return
        if name == "webdataset":
            if self.config.cache_mb is not None:
                raise ValueError("data.cache_mb cannot take effect on data.name='webdataset': "
                                 "a stream reads each record once per pass, so there is "
                                 "nothing to memoise; remove the setting")
            self.train_listing = None
            self.train_shards = webdataset_source.expand_shards(self.config.train_path)
        else:
            self.train_listing = self._listing("train")
            self.train_listing.require_usable()
        self.tokenizer = self._file_tokenizer()

    def _listing(self, split: str) -> sources.Listing:
        """The Listing of a split of a file source (SourceError naming what is missing)."""
        c = self.config
        if split == "zeroshot":
            if not c.zeroshot_path:
                raise sources.SourceError("split 'zeroshot' needs data.zeroshot_path (an image "
                                          "folder)")
            return sources.read_listing("image_folder", c.zeroshot_path, split, c)
        if split == "train":
            if not c.train_path:
                raise sources.SourceError(f"data.name={self.name!r} needs data.train_path")
            return sources.read_listing(self.name, c.train_path, split, c)
        if split not in _EVAL_PATHS:
            raise ValueError(f"split {split!r} is unknown; valid: "
                             f"{['train', *_EVAL_PATHS, 'zeroshot']}")
        path = c[_EVAL_PATHS[split]]
        if path:
            return sources.read_listing(self.name, path, split, c)
        listing = sources.read_listing(self.name, c.train_path, split, c)
        if not listing.has_splits:
            raise sources.SourceError(f"split {split!r} needs data.{_EVAL_PATHS[split]}: "
                                      f"{c.train_path} holds a single split")
        return listing

    def _file_tokenizer(self):
        c = self.config
        if c.tokenizer_path:
            return Tokenizer(os.path.expanduser(c.tokenizer_path))
        if c.tokenizer == "shapes":
            return shapes_builder.load_tokenizer(c)
        extra = []
        if c.zeroshot_path:
            names = self._listing("zeroshot").class_names
            extra = [p for n in names for p in sources.class_prompts(n, c.prompt_templates)]
        if self.name == "webdataset":
            captions = webdataset_source.cached_caption_sample(
                self.train_shards, c.tokenizer_sample,
                os.path.join(shapes_builder.data_dir(c), sources.TOKENIZER_DIR))
            if not captions:
                raise sources.SourceError(f"{c.train_path}: no usable caption in the shards")
            sentences = captions + extra
        else:
            sentences = sources.tokenizer_sentences(self.train_listing, extra)
        return sources.trained_tokenizer(
            sentences, c.vocab_size,
            os.path.join(shapes_builder.data_dir(c), sources.TOKENIZER_DIR))

    def location(self) -> str:
        if self.records is not None:
            return self.records.location()
        if self.name == "webdataset":
            return str(self.config.train_path)
        if self.builder is None:
            return str(self.train_listing.origin)
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
        traces these (never a global-size array). Derived from `task_fields.field_shapes`
        (image, text and the fields data.text_tasks adds) less `label` and the optional
        views / caption candidates, which no model's initialisation reads."""
        shapes = task_fields.field_shapes(self.config)
        skip = {"label", "image2", "captions"}
        return {k: jax.ShapeDtypeStruct((1, *shape), dtype)
                for k, (shape, dtype) in shapes.items() if k not in skip}

    def train_source(self):
        """The raw train records handed to the pipeline (a `__len__` / `__getitem__` object of
        dicts with image, captions, label); None means the dataset's own train split.
        Tests override it to inject bad records."""
        if self.name in ("shapes", "webdataset"):
            return None
        if self.records is not None:
            return self.records.train_source()
        return sources.FileRecords(self.train_listing, self.name)

    def train_iterator(self, global_batch_size: int, seed: int) -> pipeline.TrainIterator:
        """This process's batches; `issue_totals()` counts the bad records it met."""
        if self.name == "webdataset":
            return webdataset_source.make_train_iterator(
                self.config, global_batch_size=global_batch_size, seed=seed,
                shards=self.train_shards, tokenizer=self.tokenizer, photos=self.photos,
                process_index=jax.process_index(), process_count=jax.process_count())
        return pipeline.make_train_iterator(
            self.config, global_batch_size=global_batch_size, seed=seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            source=self.train_source(), tokenizer=self.tokenizer,
            photos=None if self.name == "shapes" else self.photos)

    @functools.lru_cache(maxsize=8)
    def load_eval_set(self, split: str, max_examples: int | None = None) -> EvalSet:
        """An evaluation split: shapes' 'train' / 'validation' / 'test'; a file source's
        'validation', 'test', 'zeroshot' (or 'train'), preprocessed by the evaluation
        transform (shorter side resized, centre crop)."""
        if self.name == "shapes":
            return pipeline.load_eval_set(self.config, split, max_examples)
        if self.records is not None:
            return self.records.load_eval_set(split, self.photos, max_examples)
        if self.name == "webdataset" and split != "zeroshot":
            return self._webdataset_eval_set(split, max_examples)
        listing = self.train_listing if split == "train" else self._listing(split)
        return sources.load_eval_set(listing, self.photos, self.config.prompt_templates,
                                     max_examples)

    def _webdataset_eval_set(self, split: str, max_examples: int | None) -> EvalSet:
        """'train' (the training shards) or 'validation' / 'test' (data.val_path /
        data.test_path shards), read in order."""
        if split == "train":
            shards = self.train_shards
        elif split in _EVAL_PATHS:
            pattern = self.config[_EVAL_PATHS[split]]
            if not pattern:
                raise sources.SourceError(f"split {split!r} of data.name='webdataset' needs "
                                          f"data.{_EVAL_PATHS[split]} (a shard pattern)")
            shards = webdataset_source.expand_shards(pattern)
        else:
            raise ValueError(f"split {split!r} is unknown; valid: "
                             f"{['train', *_EVAL_PATHS, 'zeroshot']}")
        return webdataset_source.load_eval_set(shards, self.photos, self.config.prompt_templates,
                                               max_examples)
