"""`vlp-jax data build`: any registered source -> an array_record directory with a manifest
(layout: `vlp_jax.data.array_record_source`).

    vlp-jax data build --from coco_json captions_train2014.json --root train2014/ --out d/ --split train
    vlp-jax data build --from karpathy dataset_coco.json --root coco/ --out d/   # train, validation, test
    vlp-jax data build --from csv a.csv b.csv --out d/ --csv-img-key filepath --csv-caption-key title
    vlp-jax data build --from webdataset '/cc3m/{00000..00331}.tar' --out d/ --vocab-size 32000
    vlp-jax data build --from image_folder imagenet/val --out zs/ --split validation

Formats (`FORMATS`): coco_json (COCO captions or Karpathy JSON), karpathy (Karpathy JSON; all
three splits unless --split), csv / tsv, webdataset (shard patterns), image_folder. Several
SRC are concatenated into the split in the order given. Every record is checked as the
training pipeline would check it (`photo.decode_rgb` decodes the image, `sanitize.clean_captions`
the captions): records the pipeline would skip are left out and counted by kind under the
pipeline's `data/<kind>` names (`sanitize.ISSUE_KINDS`), each with its reason (file and why)
in the manifest (the first MAX_REASONS per split); kept records store the image bytes exactly
as in the source and their non-empty captions. A malformed annotation file raises SourceError
before anything is written; a split with no usable record raises SourceError too.

Tokenizer: `--tokenizer FILE.model` is copied (and checked); else, when DIR already has one,
it is kept; else a sentencepiece model (`tokenizer.train_tokenizer`, BPE, `--vocab-size` an
upper bound) is trained on up to TOKENIZER_SENTENCES captions of the 'train' split (of the
first split built when there is no train split), drawn by reservoir sampling with a fixed seed.

Building into a directory that already holds a manifest adds the new split(s) (an existing
split of the same name is an error); the manifest is rewritten last, atomically, so an
interrupted build leaves the previous manifest valid.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from vlp_jax.config_schema import resolve_part
from vlp_jax.data import array_record_source as ar
from vlp_jax.data import photo, sanitize, sources, webdataset_source
from vlp_jax.data.sources import SourceError
from vlp_jax.data.tokenizer import Tokenizer, train_tokenizer

FORMATS = ("coco_json", "karpathy", "csv", "tsv", "webdataset", "image_folder")
TOKENIZER_SENTENCES = sources.TOKENIZER_SENTENCES
DEFAULT_VOCAB_SIZE = 32000
DEFAULT_RECORDS_PER_SHARD = 10000
_MAX_SKIP_LOGS = 20


def _reader_config(fmt: str, root: str | None, csv_options: dict, prompt_templates):
    """The data section the file readers take (their fields: image_root, csv_*, prompts)."""
    name = {"karpathy": "coco_json", "tsv": "csv"}.get(fmt, fmt)
    node = {"name": name}
    if root:
        if fmt == "webdataset":
            raise SourceError("--root does not apply to webdataset shards (images are inside)")
        node["image_root"] = root
    if csv_options:
        if name != "csv":
            raise SourceError(f"--csv-* options apply to --from csv / tsv, not {fmt}")
        node.update({k: v for k, v in csv_options.items() if v is not None})
    if fmt == "tsv" and not node.get("csv_separator"):
        node["csv_separator"] = "\t"
    if prompt_templates is not None:
        node["prompt_templates"] = list(prompt_templates)
    return resolve_part("data", node)


def _listing_records(listings: Sequence[sources.Listing]) -> Iterator[dict]:
    for listing in listings:
        for entry in listing.entries:
            yield sources.read_record(entry)


def _shard_records(shards: Sequence[str]) -> Iterator[dict]:
    for shard in shards:
        for _, key, parts, problem in webdataset_source.shard_samples(shard):
            yield webdataset_source.sample_record(shard, key, parts, problem)


def read_inputs(fmt: str, inputs: Sequence[str], split: str | None, config
                ) -> dict[str, tuple[Callable[[], Iterator[dict]], tuple[str, ...]]]:
    """{split: (a function making the raw-record stream, class names)} of the inputs; the
    annotation files are all parsed here (SourceError before any output is written)."""
    if fmt not in FORMATS:
        raise SourceError(f"--from {fmt!r} is unknown; valid: {list(FORMATS)}")
    if not inputs:
        raise SourceError("data build needs at least one SRC")
    if fmt == "webdataset":
        shards = [s for spec in inputs for s in webdataset_source.expand_shards(spec)]
        return {split or "train": (lambda: _shard_records(shards), ())}
    reader = {"karpathy": "coco_json", "tsv": "csv"}.get(fmt, fmt)
    if fmt in ("karpathy", "coco_json"):
        probe = [sources.read_listing(reader, p, split or "train", config) for p in inputs]
        karpathy = [l.has_splits for l in probe]
        if fmt == "karpathy" and not all(karpathy):
            bad = [l.origin for l, k in zip(probe, karpathy) if not k]
            raise SourceError(f"{bad[0]}: not a Karpathy-split file (no per-image 'split'); "
                              "use --from coco_json")
        if any(karpathy) and not all(karpathy):
            raise SourceError("mixing Karpathy-split and COCO-captions files in one build; build "
                              "them separately (--split)")
        if all(karpathy) and split is None:
            return {s: _listings_split(reader, inputs, s, config) for s in sources.KARPATHY_SPLITS}
    return {split or "train": _listings_split(reader, inputs, split or "train", config)}


def _listings_split(reader: str, inputs: Sequence[str], split: str, config):
    listings = [sources.read_listing(reader, p, split, config) for p in inputs]
    names = {l.class_names for l in listings}
    if len(names) > 1:
        raise SourceError(f"{[l.origin for l in listings]}: image folders with different "
                          "classes cannot be built into one split")
    return (lambda: _listing_records(listings)), names.pop()


class _Reservoir:
    """A uniform sample of at most `size` captions of a stream (Vitter's algorithm R, seeded)."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seen, self.items = size, 0, []
        self.rng = np.random.default_rng(seed)

    def add(self, text: str) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(text)
        else:
            j = int(self.rng.integers(self.seen))
            if j < self.size:
                self.items[j] = text


def check_record(record: dict) -> tuple[list[str], list[str]]:
    """(usable captions, kept-issue kinds) of a raw record, or BadExample naming the record:
    the pipeline's checks (source verdict, image decode, captions)."""
    where = record.get("path", "") or "?"
    if "issue_kind" in record:
        raise sanitize.BadExample(record["issue"], record["issue_kind"])
    try:
        _, converted = photo.decode_rgb(record["image"])
        captions, dropped = sanitize.clean_captions(record["captions"])
    except sanitize.BadExample as e:
        raise sanitize.BadExample(f"{where}: {e}", e.kind) from None
    kinds = (["converted_channels"] if converted else []) + (
        ["dropped_empty_caption"] if dropped else [])
    return captions, kinds


def write_split(directory: str, split: str, stream: Iterator[dict], class_names: Sequence[str],
                records_per_shard: int, reservoir: _Reservoir | None, log) -> dict:
    """Writes the usable records of `stream`; returns the split's manifest entry."""
    writer = ar.ShardWriter(directory, split, records_per_shard)
    counts: dict[str, int] = {}
    reasons: list[dict] = []
    n_captions = 0
    try:
        for record in stream:
            try:
                captions, kinds = check_record(record)
            except sanitize.BadExample as e:
                counts[e.kind] = counts.get(e.kind, 0) + 1
                skipped = sum(v for k, v in counts.items() if k.startswith("skipped_"))
                if skipped <= _MAX_SKIP_LOGS:
                    logging.warning("data build: skipping a %s record: %s", split, e)
                if len(reasons) < ar.MAX_REASONS:
                    reasons.append({"kind": e.kind, "reason": str(e)})
                continue
            for k in kinds:
                counts[k] = counts.get(k, 0) + 1
            writer.write(ar.encode_record(record["image"], captions, record["label"],
                                          record.get("path", "")))
            n_captions += len(captions)
            if reservoir is not None:
                for c in captions:
                    reservoir.add(c)
    finally:
        files = writer.close()
    skipped = {k: v for k, v in counts.items() if k.startswith("skipped_")}
    if writer.count == 0:
        for name in files:
            os.remove(os.path.join(directory, name))
        raise SourceError(f"split {split!r}: no usable record (skipped {skipped}; e.g. "
                          f"{reasons[0]['reason'] if reasons else 'the source is empty'})")
    log(f"{split}: {writer.count} records in {len(files)} file(s), skipped "
        f"{sum(skipped.values())} {skipped or ''}".rstrip())
    return {"records": writer.count, "files": files, "captions": n_captions,
            "class_names": list(class_names), "skipped": skipped,
            "kept_issues": {k: v for k, v in counts.items() if k not in skipped},
            "skipped_records": reasons,
            "skipped_reasons_left_out": max(0, sum(skipped.values()) - len(reasons))}


def build(fmt: str, inputs: Sequence[str], out: str, *, root: str | None = None,
          split: str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
          tokenizer: str | None = None, records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
          csv_options: dict | None = None, prompt_templates: Sequence[str] | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Builds (or extends) the directory `out` from `inputs` read as `fmt`; returns the
    manifest (see the module docstring)."""
    if fmt not in FORMATS:
        raise SourceError(f"--from {fmt!r} is unknown; valid: {list(FORMATS)}")
    if split is not None and (not split or "/" in split or split.startswith(".")):
        raise SourceError(f"--split {split!r} is not a usable split name")
    if vocab_size < 16:
        raise SourceError(f"--vocab-size must be >= 16, got {vocab_size}")
    out = os.path.abspath(os.path.expanduser(out))
    inputs = [os.path.expanduser(p) for p in inputs]
    config = _reader_config(fmt, root, csv_options or {}, prompt_templates)
    plan = read_inputs(fmt, inputs, split, config)           # annotation errors raise here
    given = Tokenizer(os.path.expanduser(tokenizer)) if tokenizer else None

    manifest = _existing_manifest(out)
    clash = sorted(set(plan) & set(manifest["splits"]))
    if clash:
        raise SourceError(f"{out}: split(s) {clash} already built; remove the directory or "
                          "build another --split")
    os.makedirs(out, exist_ok=True)
    train_tokenizer_now = given is None and not manifest["tokenizer"]
    token_split = "train" if "train" in plan else next(iter(plan))
    reservoir = _Reservoir(TOKENIZER_SENTENCES) if train_tokenizer_now else None
    for name, (stream, class_names) in plan.items():
        manifest["splits"][name] = write_split(
            out, name, stream(), class_names, records_per_shard,
            reservoir if name == token_split else None, log)
        for f in manifest["splits"][name]["files"]:
            manifest["files"][f] = _file_info(os.path.join(out, f))

    if given is not None or train_tokenizer_now:
        if given is not None:
            model, origin = given.model_bytes, f"copied from {os.path.abspath(tokenizer)}"
        else:
            extra = [t.format(c) for names in (v[1] for v in plan.values()) for c in names
                     for t in config.prompt_templates]
            model = train_tokenizer(reservoir.items + extra, vocab_size)
            origin = (f"sentencepiece BPE trained on {len(reservoir.items)} of "
                      f"{reservoir.seen} '{token_split}' captions (+{len(extra)} class prompts), "
                      f"vocab_size <= {vocab_size}")
        path = os.path.join(out, ar.TOKENIZER_FILE)
        with open(path + ".tmp", "wb") as f:
            f.write(model)
        os.replace(path + ".tmp", path)
        manifest["tokenizer"] = {"file": ar.TOKENIZER_FILE,
                                 "vocab_size": Tokenizer(path).vocab_size, "origin": origin}
        manifest["files"][ar.TOKENIZER_FILE] = _file_info(path)
        log(f"tokenizer: {origin} -> {manifest['tokenizer']['vocab_size']} pieces")

    manifest["sources"].append({"format": fmt, "inputs": [os.path.abspath(p) if "{" not in p
                                                           else p for p in inputs],
                                "root": os.path.abspath(root) if root else None,
                                "splits": list(plan)})
    manifest["checksum"] = ar.files_checksum(manifest["files"])
    _write_manifest(out, manifest)
    log(f"wrote {out}/{ar.MANIFEST} (checksum {manifest['checksum'][:16]}...)")
    return manifest


def _file_info(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": ar.file_sha256(path)}


def _existing_manifest(out: str) -> dict:
    if os.path.isfile(os.path.join(out, ar.MANIFEST)):
        return ar.read_manifest(out)
    if os.path.isdir(out) and os.listdir(out):
        raise SourceError(f"{out}: exists, is not empty and has no {ar.MANIFEST}; choose a new "
                          "--out directory")
    return {"format": ar.FORMAT, "version": ar.VERSION, "sources": [], "splits": {},
            "tokenizer": {}, "files": {}, "checksum": ""}


def _write_manifest(out: str, manifest: dict) -> None:
    path = os.path.join(out, ar.MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)

