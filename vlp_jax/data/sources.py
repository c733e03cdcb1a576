"""Image-text data read from files on disk, behind a registry of readers chosen by `data.name`.

    @register_source("my_format")
    def read_my_format(path: str, split: str, data_config) -> Listing: ...

A reader turns one annotation file (or folder) into a `Listing`: one `Entry` per image (its
file path, captions and label) and, for classification folders, the class names. Readers
built in:

  * `coco_json`: the COCO captions layout {"images": [{"id", "file_name"}], "annotations":
    [{"image_id", "caption"}]} (the file is the split; the captions of an image are grouped),
    and the Karpathy-split layout of dataset_coco.json / dataset_flickr30k.json {"images":
    [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}, whose split is chosen by
    name ('train' also takes 'restval'; 'validation' is 'val'). Image paths are relative to
    `data.image_root` (default: the annotation file's folder), Karpathy's under `filepath`.
  * `csv`: one (image path, caption) pair per row, columns `data.csv_img_key` /
    `data.csv_caption_key`, separator `data.csv_separator` (default: tab for .tsv, else ','),
    open_clip's conventions; rows of one image are grouped.
  * `image_folder`: one sub-folder per class (its name with '_' -> ' ' is the class name),
    for zero-shot classification; an image's captions are the class prompts
    (`data.prompt_templates`).

Problems are handled at two levels:
  * a file that cannot be read as its format (bad JSON, missing keys or columns, no
    sub-folders) raises `SourceError` naming the file and what is wrong, before training;
  * a bad record (missing image file, annotation naming an unknown image, a row lacking a
    column, a caption that is not UTF-8) becomes an Entry with an `issue` (kind, reason): the
    pipeline skips it, logs the reason and counts it under `data/<kind>`
    (`vlp_jax.data.sanitize.ISSUE_KINDS`), like images that fail to decode at read time.
    A listing with no usable entry raises `SourceError` at start.

Other values of `data.name` that are not listings: 'webdataset' (tar shards streamed,
`webdataset_source`), 'array_record' (a directory `vlp-jax data build` wrote from any reader
here or from shards, `array_record_source` / `build`) and 'tfds' (a prepared TFDS dataset,
`tfds_source`).

`FileRecords` is the random-access record source the train pipeline reads (images read from
disk lazily, in `__getitem__`); `load_eval_set` decodes a split into an `EvalSet`;
`source_tokenizer` trains (once, cached by content hash) or loads the tokenizer.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from typing import Callable, Iterable, Sequence

import numpy as np

from vlp_jax.data import photo, sanitize
from vlp_jax.data.tokenizer import Tokenizer, train_tokenizer
from vlp_jax.data.types import EvalSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KARPATHY_SPLITS = {"train": ("train", "restval"), "validation": ("val",), "test": ("test",)}
TOKENIZER_SENTENCES = 200_000      # training captions fed to sentencepiece (evenly spaced)
TOKENIZER_DIR = "vlp_tokenizers"   # under the shapes builder's data dir
_MAX_EVAL_SKIP_LOGS = 20


class SourceError(ValueError):
    """An annotation file or folder that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One image: `path` to its file, its captions, its class id (-1: none) and, for a bad
    record, `issue` = (sanitize.ISSUE_KINDS kind, reason)."""
    path: str | None
    captions: tuple[str, ...]
    label: int = -1
    issue: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a reader found in `origin`: its entries, class names (classification folders) and
    whether the file holds several named splits (Karpathy)."""
    origin: str
    entries: tuple[Entry, ...]
    class_names: tuple[str, ...] = ()
    has_splits: bool = False

    def usable(self) -> list[Entry]:
        return [e for e in self.entries
                if e.issue is None and any(c.strip() for c in e.captions)]

    def issue_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.entries:
            if e.issue is not None:
                counts[e.issue[0]] = counts.get(e.issue[0], 0) + 1
        return counts

    def require_usable(self) -> None:
        """Raises SourceError when no entry can be used."""
        if not self.usable():
            raise SourceError(f"{self.origin}: no usable image-caption records among "
                              f"{len(self.entries)} (problems: {self.issue_counts()})")


Reader = Callable[[str, str, object], Listing]
SOURCES: dict[str, Reader] = {}


def register_source(name: str):
    """Decorator registering `reader(path, split, data_config) -> Listing` as `data.name`."""
    def wrap(fn: Reader) -> Reader:
        if name in SOURCES and SOURCES[name] is not fn:
            raise ValueError(f"data source {name!r} is already registered")
        SOURCES[name] = fn
        return fn
    return wrap


def read_listing(name: str, path: str, split: str, data_config) -> Listing:
    """The Listing of `path` by source `name` (SourceError when unreadable)."""
    if name not in SOURCES:
        raise ValueError(f"data.name {name!r} is unknown; valid: {sorted(SOURCES)}")
    if not path:
        raise SourceError(f"data.name {name!r} needs a path for split {split!r}")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or folder")
    return SOURCES[name](path, split, data_config)


# ----------------------------------------------------------------------------- helpers

def _image_root(path: str, data_config) -> str:
    root = data_config.get("image_root", None)
    return os.path.abspath(os.path.expanduser(root)) if root else os.path.dirname(path)


def _image_entry(path: str, captions: Sequence[str], label: int = -1) -> Entry:
    """An Entry, with an issue when the image file is missing or a caption is not UTF-8."""
    captions = tuple(captions)
    for c in captions:
        try:
            c.encode("utf-8")
        except UnicodeEncodeError:
            return Entry(path, captions, label, ("skipped_malformed",
                                                 f"{path}: caption is not UTF-8: {c!r}"))
    if not os.path.isfile(path):
        return Entry(path, captions, label, ("skipped_undecodable",
                                             f"{path}: missing image file"))
    return Entry(path, captions, label)


def _load_json(path: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not a JSON annotation file ({type(e).__name__}: {e})"
                          ) from None


def _key(item, key: str, path: str, where: str):
    if not isinstance(item, dict) or key not in item:
        raise SourceError(f"{path}: {where} lacks the key {key!r}"
                          + ("" if isinstance(item, dict) else f" (got {type(item).__name__})"))
    return item[key]


# ----------------------------------------------------------------------------- readers

@register_source("coco_json")
def read_coco_json(path: str, split: str, data_config) -> Listing:
    """COCO captions or Karpathy-split JSON -> Listing (see the module docstring)."""
    doc = _load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise SourceError(f"{path}: expected an object with an 'images' list (COCO captions "
                          "or Karpathy layout)")
    root = _image_root(path, data_config)
    if "annotations" in doc:
        return _read_coco_captions(path, doc, root)
    return _read_karpathy(path, doc, root, split)


def _read_coco_captions(path: str, doc: dict, root: str) -> Listing:
    if not isinstance(doc["annotations"], list):
        raise SourceError(f"{path}: 'annotations' must be a list")
    files, captions, order = {}, {}, []
    for i, image in enumerate(doc["images"]):
        image_id = _key(image, "id", path, f"images[{i}]")
        files[image_id] = os.path.join(root, str(_key(image, "file_name", path, f"images[{i}]")))
        captions[image_id] = []
        order.append(image_id)
    orphans = []
    for i, ann in enumerate(doc["annotations"]):
        image_id = _key(ann, "image_id", path, f"annotations[{i}]")
        caption = _key(ann, "caption", path, f"annotations[{i}]")
        if image_id not in files:
            orphans.append(Entry(None, (str(caption),), -1, (
                "skipped_malformed",
                f"{path}: annotations[{i}] names image_id {image_id!r}, absent from 'images'")))
        elif not isinstance(caption, str):
            orphans.append(Entry(files[image_id], (), -1, (
                "skipped_malformed",
                f"{path}: annotations[{i}] caption is a {type(caption).__name__}")))
        else:
            captions[image_id].append(caption)
    entries = [_image_entry(files[k], captions[k]) for k in order]
    return Listing(path, tuple(entries + orphans))


def _read_karpathy(path: str, doc: dict, root: str, split: str) -> Listing:
    if split not in KARPATHY_SPLITS:
        raise SourceError(f"{path}: Karpathy-split files hold {sorted(KARPATHY_SPLITS)}, not "
                          f"{split!r}")
    wanted = KARPATHY_SPLITS[split]
    entries = []
    for i, item in enumerate(doc["images"]):
        where = f"images[{i}]"
        if _key(item, "split", path, where) not in wanted:
            continue
        name = str(_key(item, "filename", path, where))
        sentences = _key(item, "sentences", path, where)
        if not isinstance(sentences, list):
            raise SourceError(f"{path}: {where}.sentences must be a list")
        caps = [_key(s, "raw", path, f"{where}.sentences[{j}]")
                for j, s in enumerate(sentences)]
        file = os.path.join(root, str(item.get("filepath", "")), name)
        if not all(isinstance(c, str) for c in caps):
            entries.append(Entry(file, (), -1, ("skipped_malformed",
                                                f"{path}: {where} has a caption that is not text")))
        else:
            entries.append(_image_entry(file, caps))
    return Listing(path, tuple(entries), has_splits=True)


def _csv_separator(path: str, data_config) -> str:
    sep = data_config.get("csv_separator", None)
    if sep:
        return {"\\t": "\t", "tab": "\t"}.get(sep, sep)
    return "\t" if path.lower().endswith(".tsv") else ","


@register_source("csv")
def read_csv(path: str, split: str, data_config) -> Listing:
    """CSV / TSV of (image path, caption) rows -> Listing, captions grouped by image."""
    img_key = data_config.get("csv_img_key", "filepath")
    cap_key = data_config.get("csv_caption_key", "title")
    sep = _csv_separator(path, data_config)
    root = _image_root(path, data_config)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        columns = reader.fieldnames or []
        missing = [k for k in (img_key, cap_key) if k not in columns]
        if missing:
            raise SourceError(f"{path}: no column(s) {missing} (separator {sep!r}); the header "
                              f"has {columns}; set data.csv_img_key / data.csv_caption_key / "
                              "data.csv_separator")
        groups: dict[str, list[str]] = {}
        bad = []
        for row_no, row in enumerate(reader, start=2):
            image, caption = row.get(img_key), row.get(cap_key)
            if image is None or caption is None or not image.strip():
                bad.append(Entry(None, (), -1, ("skipped_malformed",
                                                f"{path}: line {row_no} lacks a column")))
                continue
            groups.setdefault(image.strip(), []).append(caption)
    entries = [_image_entry(os.path.join(root, image), caps) for image, caps in groups.items()]
    return Listing(path, tuple(entries + bad))


def class_prompts(name: str, templates: Sequence[str]) -> tuple[str, ...]:
    return tuple(t.format(name) for t in templates)


@register_source("image_folder")
def read_image_folder(path: str, split: str, data_config) -> Listing:
    """<path>/<class>/<image> -> Listing with labels by sorted class folder; captions are the
    class prompts."""
    if not os.path.isdir(path):
        raise SourceError(f"{path}: an image folder must be a directory of class folders")
    classes = sorted(d for d in os.listdir(path)
                     if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if not classes:
        raise SourceError(f"{path}: no class sub-folders")
    templates = tuple(data_config.prompt_templates)
    names = tuple(d.replace("_", " ") for d in classes)
    entries = []
    for label, (folder, name) in enumerate(zip(classes, names)):
        prompts = class_prompts(name, templates)
        for file in sorted(os.listdir(os.path.join(path, folder))):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                entries.append(_image_entry(os.path.join(path, folder, file), prompts, label))
    return Listing(path, tuple(entries), class_names=names)


# ----------------------------------------------------------------------------- records

def read_record(entry: Entry) -> dict:
    """The pipeline's raw record of an Entry: {image: file bytes, captions, label, path}, plus
    {issue_kind, issue} for a bad entry or an image file that cannot be read now."""
    record = {"captions": list(entry.captions), "label": entry.label, "path": entry.path or ""}
    issue = entry.issue
    if issue is None:
        try:
            with open(entry.path, "rb") as f:
                record["image"] = f.read()
        except OSError as e:
            issue = ("skipped_undecodable", f"{entry.path}: cannot read ({type(e).__name__})")
    if issue is not None:
        record.update(image=b"", issue_kind=issue[0], issue=issue[1])
    return record


class FileRecords:
    """Random-access train records of a Listing (image bytes read from disk per access)."""

    def __init__(self, listing: Listing, name: str):
        self.listing, self.name = listing, name

    def __len__(self) -> int:
        return len(self.listing.entries)

    def __getitem__(self, index: int) -> dict:
        return read_record(self.listing.entries[index])


def eval_set_from_records(records: Iterable[tuple[dict, str, int]],
                          transform: photo.PhotoTransform, prompt_templates: Sequence[str],
                          max_examples: int | None, origin: str,
                          class_names: Sequence[str] = ()) -> EvalSet:
    """An EvalSet of the first `max_examples` usable records (default all) of a lazy stream of
    (record, file path, label), each image preprocessed by `transform.eval`; bad records are
    skipped with a warning naming the file (SourceError when none is left). Shared by the
    listing sources and the webdataset stream."""
    if max_examples is not None and int(max_examples) < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    images, captions, labels, skipped = [], [], [], {}
    for record, path, label in records:
        if max_examples is not None and len(images) >= int(max_examples):
            break
        try:
            if "issue" in record:
                raise sanitize.BadExample(record["issue"], record["issue_kind"])
            image, _ = transform.clean(record["image"])
            caps, _ = sanitize.clean_captions(record["captions"])
        except sanitize.BadExample as e:
            skipped[e.kind] = skipped.get(e.kind, 0) + 1
            if sum(skipped.values()) <= _MAX_EVAL_SKIP_LOGS:
                logging.warning("skipping eval record of %s: %s", origin,
                                e if path and path in str(e) else f"{path}: {e}")
            continue
        images.append(transform.eval(image))
        captions.append(caps)
        labels.append(label)
    if skipped:
        logging.warning("%s: %d evaluation records skipped %s", origin, sum(skipped.values()),
                        skipped)
    if not images:
        raise SourceError(f"{origin}: no usable evaluation images (skipped: {skipped})")
    return EvalSet(images=np.stack(images).astype(np.float32), captions=captions,
                   labels=np.asarray(labels, np.int32), class_names=list(class_names),
                   prompt_templates=list(prompt_templates))


def load_eval_set(listing: Listing, transform: photo.PhotoTransform,
                  prompt_templates: Sequence[str], max_examples: int | None = None) -> EvalSet:
    """The first `max_examples` usable images of `listing` (default all), see
    `eval_set_from_records`. Labels are -1 where the source has no classes."""
    records = ((read_record(e), e.path, e.label) for e in listing.entries)
    return eval_set_from_records(records, transform, prompt_templates, max_examples,
                                 listing.origin, listing.class_names)


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_sentences(listing: Listing, extra: Sequence[str] = ()) -> list[str]:
    """Up to TOKENIZER_SENTENCES captions of the usable entries (evenly spaced), then
    `extra` (e.g. zero-shot prompts)."""
    caps = [c for e in listing.usable() for c in e.captions if c.strip()]
    if len(caps) > TOKENIZER_SENTENCES:
        keep = np.linspace(0, len(caps) - 1, TOKENIZER_SENTENCES).astype(int)
        caps = [caps[i] for i in keep]
    return caps + list(extra)


def trained_tokenizer(sentences: Sequence[str], vocab_size: int, cache_dir: str) -> Tokenizer:
    """A sentencepiece tokenizer trained on `sentences` (`tokenizer.train_tokenizer`), cached
    as <cache_dir>/spm_<sha256 of the sentences and vocab_size>.model: the same captions
    reuse it, changed captions train a new one."""
    digest = hashlib.sha256(f"v{int(vocab_size)}\n".encode())
    for s in sentences:
        digest.update(s.encode("utf-8", "surrogateescape") + b"\n")
    path = os.path.join(cache_dir, f"spm_{digest.hexdigest()[:20]}.model")
    if not os.path.exists(path):
        model = train_tokenizer(sentences, int(vocab_size))
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(model)
        os.replace(tmp, path)
    return Tokenizer(path)
