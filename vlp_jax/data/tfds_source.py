"""An already prepared TFDS dataset as image-text data (`data.name='tfds'`).

    data.tfds_name='coco_captions/2017:1.1.0'   # name[/config][:version], as tfds.builder takes
    data.tfds_data_dir='~/tensorflow_datasets'   # None: TFDS's default ($TFDS_DATA_DIR, ...)
    data.tfds_image_key='image'                  # feature keys of the image, the caption(s) and
    data.tfds_text_key='captions/text'           # (optional) the class label; '/' walks nested
    data.tfds_label_key=None                     # features (a Sequence of dicts gives a list)
    data.tfds_train_split / tfds_val_split / tfds_test_split   # TFDS split names (slices ok)

Reading goes through `tfds.data_source` (random access on the array_record files, no
TensorFlow import; the image feature is read undecoded with `tfds.decode.SkipDecoding` and
decoded by PIL like every other source's). Nothing is ever downloaded or prepared here: a
dataset that is not registered or not prepared in the data dir raises SourceError (one line)
saying how to prepare it (`tfds build NAME --data_dir DIR --file_format=array_record`);
a dataset stored as tfrecord, which `tfds.data_source` cannot read, likewise.

Records handed to the pipeline: {image: encoded bytes (or a uint8 array when the feature is a
plain tensor), captions: [str] (a text feature or a sequence of them), label: int (-1
without a label key), path: '<name>/<split>[<index>]'}; a record lacking a mapped feature is
counted as skipped_malformed. Class names come from a ClassLabel label feature (for zero-shot
evaluation). The tokenizer (`DataBridge`) is trained on the first data.tokenizer_sample
training captions unless data.tokenizer_path / data.tokenizer='shapes' say otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
import numpy as np

from vlp_jax.data import photo, sources
from vlp_jax.data.sources import SourceError
from vlp_jax.data.tokenizer import Tokenizer
from vlp_jax.data.types import EvalSet

SPLIT_FIELDS = {"train": "tfds_train_split", "validation": "tfds_val_split",
                "test": "tfds_test_split"}


def _prepare_hint(name: str, data_dir: str | None) -> str:
    where = f" --data_dir {data_dir}" if data_dir else ""
    return (f"prepare it once with `tfds build {name}{where} --file_format=array_record` (or "
            "builder.download_and_prepare(file_format='array_record')); vlp-jax never downloads")


def open_builder(name: str, data_dir: str | None):
    """The prepared builder of `name` in `data_dir` (SourceError with the fix otherwise)."""
    import tensorflow_datasets as tfds
    if not name:
        raise SourceError("data.name='tfds' needs data.tfds_name (e.g. 'coco_captions')")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise SourceError(f"TFDS dataset {name!r} is not prepared in "
                          f"{data_dir or 'the default data dir'}; "
                          f"{_prepare_hint(name, data_dir)}") from None
    if not builder.is_prepared():
        raise SourceError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; "
                          f"{_prepare_hint(name, data_dir)}")
    file_format = getattr(builder.info, "file_format", None)
    file_format = str(getattr(file_format, "value", file_format) or "")
    if "array_record" not in file_format:
        raise SourceError(f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
                          f"{file_format or 'tfrecord'}; random access needs array_record: "
                          f"{_prepare_hint(name, data_dir)}")
    return builder


def _feature(features, key: str, name: str):
    node = features
    for part in key.split("/"):
        inner = getattr(node, "feature", node)          # Sequence(...) -> its element
        if not hasattr(inner, "keys") or part not in inner.keys():
            keys = sorted(inner.keys()) if hasattr(inner, "keys") else []
            raise SourceError(f"TFDS dataset {name!r} has no feature {key!r} (at {part!r}: "
                              f"features {keys}); set data.tfds_image_key / tfds_text_key / "
                              "tfds_label_key")
        node = inner[part]
    return node


def _get(example, key: str):
    """example[key] with '/' walking nested dicts (and lists of dicts, from Sequence)."""
    value = example
    for part in key.split("/"):
        if isinstance(value, (list, tuple)):
            value = [v[part] for v in value]
        else:
            value = value[part]
    return value


def _texts(value) -> list:
    if isinstance(value, (bytes, str, np.bytes_, np.str_)):
        return [value]
    return list(np.asarray(value, dtype=object).reshape(-1))


class TfdsRecords:
    """Random-access raw records of one split (see the module docstring); picklable."""

    def __init__(self, name: str, data_dir: str | None, split: str, keys: dict,
                 skip_image_decoding: bool):
        self.tfds_name, self.data_dir, self.split, self.keys = name, data_dir, split, keys
        self.skip_image_decoding = skip_image_decoding
        self.name = f"tfds[{name}/{split}]"
        self._source = None
        self._len = len(self._open())

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds
            decoders = ({self.keys["image"]: tfds.decode.SkipDecoding()}
                        if self.skip_image_decoding else None)
            try:
                self._source = tfds.data_source(self.tfds_name, split=self.split,
                                                data_dir=self.data_dir, download=False,
                                                decoders=decoders)
            except ValueError as e:   # an unknown split or slice
                raise SourceError(f"TFDS dataset {self.tfds_name!r}: {str(e).splitlines()[0]}"
                                  ) from None
        return self._source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        example = self._open()[int(index)]
        where = f"{self.tfds_name}/{self.split}[{int(index)}]"
        try:
            record = {"image": _get(example, self.keys["image"]),
                      "captions": _texts(_get(example, self.keys["text"])),
                      "label": (int(_get(example, self.keys["label"]))
                                if self.keys.get("label") else -1),
                      "path": where}
        except (KeyError, TypeError, ValueError) as e:
            return {"image": b"", "captions": [], "label": -1, "path": where,
                    "issue_kind": "skipped_malformed",
                    "issue": f"{where}: lacks a mapped feature ({type(e).__name__}: {e})"}
        if isinstance(record["image"], np.ndarray) and record["image"].dtype == object:
            record["image"] = bytes(record["image"].item())
        return record

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __setstate__(self, state):
        self.__dict__.update(state, _source=None)


class TfdsDataset:
    """What `DataBridge` needs of `data.name='tfds'`: train records, caption sample, class
    names and evaluation sets of a prepared dataset."""

    def __init__(self, data_config):
        import tensorflow_datasets as tfds
        c = self.config = data_config
        self.data_dir = (os.path.abspath(os.path.expanduser(c.tfds_data_dir))
                         if c.tfds_data_dir else None)
        builder = open_builder(c.tfds_name, self.data_dir)
        features = builder.info.features
        self.keys = {"image": c.tfds_image_key, "text": c.tfds_text_key,
                     "label": c.tfds_label_key}
        image = _feature(features, c.tfds_image_key, c.tfds_name)
        _feature(features, c.tfds_text_key, c.tfds_name)
        self.skip_image_decoding = isinstance(image, tfds.features.Image)
        self.class_names: tuple[str, ...] = ()
        if c.tfds_label_key:
            label = _feature(features, c.tfds_label_key, c.tfds_name)
            if isinstance(label, tfds.features.ClassLabel):
                self.class_names = tuple(n.replace("_", " ") for n in label.names)
        self.splits = sorted(builder.info.splits.keys())

    def location(self) -> str:
        return f"tfds:{self.config.tfds_name} ({self.data_dir or 'default data dir'})"

    def records(self, split: str) -> TfdsRecords:
        if split not in SPLIT_FIELDS:
            raise ValueError(f"split {split!r} is unknown; valid: {[*SPLIT_FIELDS, 'zeroshot']}")
        tfds_split = self.config[SPLIT_FIELDS[split]]
        if not tfds_split:
            raise SourceError(f"split {split!r} of data.name='tfds' needs "
                              f"data.{SPLIT_FIELDS[split]} (the dataset has {self.splits})")
        return TfdsRecords(self.config.tfds_name, self.data_dir, tfds_split, self.keys,
                           self.skip_image_decoding)

    def train_source(self) -> TfdsRecords:
        return self.records("train")

    def caption_sample(self, limit: int) -> list[str]:
        """The first `limit` non-empty training captions (the tokenizer's training text)."""
        source, out = self.train_source(), []
        for i in range(len(source)):
            record = source[i]
            for c in record.get("captions", []):
                text = c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
                if text.strip():
                    out.append(text)
            if len(out) >= limit:
                break
        return out[:limit]

    def tokenizer(self):
        """data.tokenizer_path, else the shapes world's (data.tokenizer='shapes'), else
        sentencepiece trained on the first data.tokenizer_sample training captions and the
        class prompts (cached under the shapes builder's data dir, as the file sources')."""
        from vlp_jax.data import shapes_builder
        c = self.config
        if c.tokenizer_path:
            return Tokenizer(os.path.expanduser(c.tokenizer_path))
        if c.tokenizer == "shapes":
            return shapes_builder.load_tokenizer(c)
        cache = os.path.join(shapes_builder.data_dir(c), sources.TOKENIZER_DIR)
        names = list(self.class_names)
        if c.zeroshot_path:
            names += sources.read_listing("image_folder", c.zeroshot_path, "zeroshot",
                                          c).class_names
        extra = [p for n in names for p in sources.class_prompts(n, c.prompt_templates)]
        captions = self.cached_caption_sample(int(c.tokenizer_sample), cache)
        if not captions:
            raise SourceError(f"TFDS dataset {c.tfds_name!r}: no caption in feature "
                              f"{c.tfds_text_key!r} of split {c.tfds_train_split!r}")
        return sources.trained_tokenizer(captions + extra, c.vocab_size, cache)

    def cached_caption_sample(self, limit: int, cache_dir: str) -> list[str]:
        """`caption_sample(limit)`, cached as <cache_dir>/tfds_captions_<sha256 of the dataset
        name, data dir, split, text key and limit>.json (a prepared TFDS dataset is
        immutable)."""
        c = self.config
        key = json.dumps([c.tfds_name, self.data_dir, c.tfds_train_split, c.tfds_text_key,
                          int(limit)])
        path = os.path.join(cache_dir, "tfds_captions_"
                            f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        captions = self.caption_sample(limit)
        os.makedirs(cache_dir, exist_ok=True)
        with open(f"{path}.tmp{os.getpid()}", "w", encoding="utf-8") as f:
            json.dump(captions, f)
        os.replace(f"{path}.tmp{os.getpid()}", path)
        return captions

    def load_eval_set(self, split: str, photos: photo.PhotoTransform,
                      max_examples: int | None = None) -> EvalSet:
        """'train' / 'validation' / 'test' (the mapped TFDS splits) or 'zeroshot' (the
        validation split with its ClassLabel names, else data.zeroshot_path, an image folder)."""
        c = self.config
        if split == "zeroshot":
            if c.zeroshot_path:
                listing = sources.read_listing("image_folder", c.zeroshot_path, split, c)
                return sources.load_eval_set(listing, photos, c.prompt_templates, max_examples)
            if not self.class_names:
                raise SourceError("split 'zeroshot' of data.name='tfds' needs a ClassLabel "
                                  "data.tfds_label_key or data.zeroshot_path (an image folder)")
            split = "validation"
        source = self.records(split)
        stream = ((r, r["path"], r["label"]) for r in (source[i] for i in range(len(source))))
        return sources.eval_set_from_records(stream, photos, c.prompt_templates, max_examples,
                                             source.name, self.class_names)

