"""Datasets written by `vlp-jax data build` (array_record files + manifest.json), read back for
training and evaluation (`data.name='array_record'`, `data.path=DIR`).

Layout of DIR:
  * `<split>-<i:05d>.array_record`: the split's records in order, at most `records_per_shard`
    per file, each written with `group_size:1` (one record per chunk: random access costs one
    chunk read). A record is a msgpack map {image: the encoded bytes as in the source (JPEG /
    PNG / WebP ...), captions: [str], label: int (-1: none), key: where it came from (a file
    path or `<shard>:<KEY>`)}.
  * `tokenizer.model`: the sentencepiece model (trained on the build's captions or copied).
  * `manifest.json`: {format: 'vlp_jax.array_record', version, source: {format, inputs, root},
    splits: {name: {records, files, captions, class_names, skipped: {kind: n},
    skipped_records: [{kind, reason}] (the first MAX_REASONS), converted...}}, tokenizer:
    {file, vocab_size, origin}, files: {name: {bytes, sha256}}, checksum (sha256 of the sorted
    "name sha256" lines)}.

Reading: `ArrayRecords` is a random-access source (`__len__`, `__getitem__` -> the pipeline's
raw record {image, captions, label, path}) over grain's `ArrayRecordDataSource`; it opens the
files lazily, so it pickles to grain's worker processes. Global shuffle and exact resume come
from the pipeline's index-based grain dataset (`pipeline.make_train_iterator`): the iterator
state is a position in a permutation of record indices. Opening checks every listed file is
present with its recorded size (a full checksum pass is `verify`, run by `vlp-jax data show
--verify`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Sequence

import msgpack
import numpy as np

from vlp_jax.data import photo, sources
from vlp_jax.data.sources import SourceError
from vlp_jax.data.tokenizer import Tokenizer
from vlp_jax.data.types import EvalSet

FORMAT = "vlp_jax.array_record"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
WRITER_OPTIONS = "group_size:1"
MAX_REASONS = 1000       # skipped records listed with their reason in the manifest, per split
EVAL_SPLITS = {"validation": ("validation", "val"), "test": ("test",), "train": ("train",)}


# ----------------------------------------------------------------------------- records

def encode_record(image: bytes, captions: Sequence[str], label: int, key: str) -> bytes:
    """One stored record: msgpack {image: bytes, captions: [str], label: int, key: str}."""
    return msgpack.packb({"image": bytes(image), "captions": [str(c) for c in captions],
                          "label": int(label), "key": str(key)}, use_bin_type=True)


def decode_record(raw: bytes) -> dict:
    """Stored bytes -> the pipeline's raw record {image: bytes, captions, label, path}; a
    record that does not unpack becomes a skipped_malformed one."""
    try:
        item = msgpack.unpackb(raw, raw=False)
        return {"image": item["image"], "captions": list(item["captions"]),
                "label": int(item["label"]), "path": item.get("key", "")}
    except (ValueError, KeyError, TypeError, msgpack.ExtraData) as e:
        return {"image": b"", "captions": [], "label": -1, "path": "",
                "issue_kind": "skipped_malformed",
                "issue": f"array_record record does not unpack ({type(e).__name__}: {e})"}


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.array_record"


class ShardWriter:
    """Writes a split's records into DIR/<split>-<i>.array_record files of at most
    `records_per_shard` records (written under a `.tmp` name; `close` renames them)."""

    def __init__(self, directory: str, split: str, records_per_shard: int):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.directory, self.split = directory, split
        self.per_shard = int(records_per_shard)
        self.files: list[str] = []
        self.count = 0
        self._writer = None

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter
        if self._writer is None or self.count % self.per_shard == 0:
            self._close_current()
            name = shard_name(self.split, len(self.files))
            self.files.append(name)
            self._writer = ArrayRecordWriter(os.path.join(self.directory, name + ".tmp"),
                                             WRITER_OPTIONS)
        self._writer.write(record)
        self.count += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        """Closes and renames the files; returns their names."""
        self._close_current()
        for name in self.files:
            path = os.path.join(self.directory, name)
            os.replace(path + ".tmp", path)
        return list(self.files)


# ----------------------------------------------------------------------------- manifest

def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_checksum(files: dict) -> str:
    """sha256 of the sorted "name sha256" lines of `files` {name: {sha256, bytes}}."""
    lines = "".join(f"{name} {files[name]['sha256']}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_manifest(directory: str) -> dict:
    """DIR/manifest.json, checked (SourceError naming the file and the problem)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise SourceError(f"{directory}: no {MANIFEST}; write the directory with `vlp-jax data "
                          "build --from FORMAT SRC... --out DIR`")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not a JSON manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SourceError(f"{path}: not a vlp_jax array_record manifest (format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != VERSION:
        raise SourceError(f"{path}: manifest version {manifest.get('version')!r}, this code "
                          f"reads version {VERSION}; rebuild the directory")
    for key in ("splits", "files", "tokenizer"):
        if not isinstance(manifest.get(key), dict):
            raise SourceError(f"{path}: the manifest lacks {key!r}")
    return manifest


def check_files(directory: str, manifest: dict) -> None:
    """SourceError when a listed file is missing or has another size than recorded."""
    for name, info in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise SourceError(f"{path}: missing (listed in {MANIFEST})")
        if os.path.getsize(path) != int(info["bytes"]):
            raise SourceError(f"{path}: {os.path.getsize(path)} bytes, {MANIFEST} records "
                              f"{info['bytes']}; the directory changed since it was built")


def verify(directory: str, manifest: dict) -> list[str]:
    """Names of the listed files whose sha256 differs from the manifest's (or are missing)."""
    bad = []
    for name, info in sorted(manifest["files"].items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or file_sha256(path) != info["sha256"]:
            bad.append(name)
    return bad


# ----------------------------------------------------------------------------- reading

class ArrayRecords:
    """Random-access raw records of one split of a built directory (see the module
    docstring); picklable (the reader is opened on first access in each process)."""

    def __init__(self, directory: str, split: str, manifest: dict | None = None):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        manifest = manifest or read_manifest(self.directory)
        if split not in manifest["splits"]:
            raise SourceError(f"{self.directory}: no split {split!r}; it holds "
                              f"{sorted(manifest['splits'])}")
        info = manifest["splits"][split]
        self.split, self.files = split, list(info["files"])
        self.num_records = int(info["records"])
        self.class_names = tuple(info.get("class_names", ()))
        self.name = f"array_record[{os.path.basename(self.directory)}/{split}]"
        self._source = None

    def _open(self):
        if self._source is None:
            import grain
            self._source = grain.sources.ArrayRecordDataSource(
                [os.path.join(self.directory, f) for f in self.files])
            if len(self._source) != self.num_records:
                raise SourceError(f"{self.directory}: split {self.split!r} has "
                                  f"{len(self._source)} records, {MANIFEST} says "
                                  f"{self.num_records}")
        return self._source

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        return decode_record(self._open()[int(index)])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __setstate__(self, state):
        self.__dict__.update(state, _source=None)


def records(directory: str, split: str) -> Iterable[dict]:
    """The raw records of a split in stored order."""
    source = ArrayRecords(directory, split)
    return (source[i] for i in range(len(source)))


class ArrayRecordDataset:
    """What `DataBridge` needs of `data.name='array_record'`: the tokenizer, the train records
    and evaluation sets of the directory `data.path`."""

    def __init__(self, data_config):
        self.config = data_config
        if not data_config.path:
            raise SourceError("data.name='array_record' needs data.path (a directory written by "
                              "`vlp-jax data build`)")
        self.directory = os.path.abspath(os.path.expanduser(data_config.path))
        self.manifest = read_manifest(self.directory)
        check_files(self.directory, self.manifest)
        if "train" not in self.manifest["splits"]:
            raise SourceError(f"{self.directory}: no 'train' split to train on; it holds "
                              f"{sorted(self.manifest['splits'])}")

    def location(self) -> str:
        return self.directory

    def tokenizer(self) -> Tokenizer:
        """data.tokenizer_path when given, else the directory's tokenizer.model."""
        if self.config.tokenizer_path:
            return Tokenizer(os.path.expanduser(self.config.tokenizer_path))
        return Tokenizer(os.path.join(self.directory, self.manifest["tokenizer"]["file"]))

    def train_source(self) -> ArrayRecords:
        return ArrayRecords(self.directory, "train", self.manifest)

    def _split(self, split: str) -> str:
        if split not in EVAL_SPLITS:
            raise ValueError(f"split {split!r} is unknown; valid: "
                             f"{[*EVAL_SPLITS, 'zeroshot']}")
        for name in EVAL_SPLITS[split]:
            if name in self.manifest["splits"]:
                return name
        raise SourceError(f"{self.directory}: no split {split!r} (it holds "
                          f"{sorted(self.manifest['splits'])}); build one with `vlp-jax data "
                          f"build ... --out {self.directory} --split {split}`")

    def load_eval_set(self, split: str, photos: photo.PhotoTransform,
                      max_examples: int | None = None) -> EvalSet:
        """'train' / 'validation' / 'test' of the directory, or 'zeroshot': data.zeroshot_path,
        another built directory (its first split with class names) or an image folder."""
        templates = self.config.prompt_templates
        if split == "zeroshot":
            return zeroshot_eval_set(self.config, photos, max_examples)
        source = ArrayRecords(self.directory, self._split(split), self.manifest)
        return eval_set(source, photos, templates, max_examples)


def eval_set(source: ArrayRecords, photos: photo.PhotoTransform,
             prompt_templates: Sequence[str], max_examples: int | None) -> EvalSet:
    """The first `max_examples` usable records of `source` (`sources.eval_set_from_records`)."""
    stream = ((r, r["path"], r["label"]) for r in (source[i] for i in range(len(source))))
    return sources.eval_set_from_records(stream, photos, prompt_templates, max_examples,
                                         f"{source.directory}/{source.split}",
                                         source.class_names)


def zeroshot_eval_set(config, photos: photo.PhotoTransform,
                      max_examples: int | None) -> EvalSet:
    """data.zeroshot_path as a zero-shot set: a built directory (its first split carrying
    class names) or an image folder (one sub-folder per class)."""
    path = config.zeroshot_path
    if not path:
        raise SourceError("split 'zeroshot' needs data.zeroshot_path (an image folder or a "
                          "directory built from one)")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, MANIFEST)):
        manifest = read_manifest(path)
        named = [s for s, info in manifest["splits"].items() if info.get("class_names")]
        if not named:
            raise SourceError(f"{path}: no split with class names (build it from an image "
                              "folder: --from image_folder)")
        return eval_set(ArrayRecords(path, named[0], manifest), photos,
                        config.prompt_templates, max_examples)
    listing = sources.read_listing("image_folder", path, "zeroshot", config)
    return sources.load_eval_set(listing, photos, config.prompt_templates, max_examples)


def sample_indices(n: int, k: int) -> np.ndarray:
    """k evenly spaced indices of range(n) (all when k >= n)."""
    if k >= n:
        return np.arange(n)
    return np.linspace(0, n - 1, k).round().astype(int)
