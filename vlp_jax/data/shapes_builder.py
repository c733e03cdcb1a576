"""The shapes world as a TFDS dataset (array_record), plus its sentencepiece tokenizer.

Layout: `<data_dir>/vlp_shapes/<config name>/<version>/` holds the TFDS files and `spm.model`.
`data_dir` is `data_config.data_dir`, else `$VLP_JAX_DATA_DIR`, else
`~/.cache/vlp_jax/tensorflow_datasets`. The config name spells out every value that changes the
data (e.g. `s64_n20000-1000-1000_c5_seed0_v256`), so different sizes coexist.

Features per example: image uint8 [S, S, 3] (PNG), captions [captions_per_image] strings,
label ClassLabel(shapes_world.CLASS_NAMES), scene (the JSON scene description).
Example i of a split is drawn from `np.random.default_rng([seed, split_id, i])`: the splits are
disjoint streams and the bytes depend only on the config. Examples are stored in order.

Building imports TensorFlow (TFDS's writer); reading (`builder.as_data_source`) does not.
`ensure_built` is idempotent and safe when several processes race (an fcntl lock), and it never
takes an interrupted build for a finished one: TFDS renames its temporary directory only when
all splits are written, and `spm.model` is written (atomically) after that.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import io
import json
import os
import shutil
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vlp_jax.config_schema import resolve_part
from vlp_jax.data import shapes_world
from vlp_jax.data.tokenizer import Tokenizer, train_tokenizer

VERSION = "1.0.0"               # bump whenever shapes_world changes what it draws or says
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
TOKENIZER_FILE = "spm.model"
TOKENIZER_SENTENCES = 10_000    # training captions fed to sentencepiece (the first ones)
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "vlp_jax", "tensorflow_datasets")
_SIZE_FIELDS = ("image_size", "num_train", "num_validation", "num_test", "captions_per_image",
                "seed", "vocab_size")


class ShapesConfig(tfds.core.BuilderConfig):
    """TFDS builder config; the name is derived from the values (see `config_name`)."""

    def __init__(self, *, image_size: int, num_train: int, num_validation: int, num_test: int,
                 captions_per_image: int, seed: int, vocab_size: int):
        values = dict(image_size=image_size, num_train=num_train, num_validation=num_validation,
                      num_test=num_test, captions_per_image=captions_per_image, seed=seed,
                      vocab_size=vocab_size)
        _validate(values)
        super().__init__(name=config_name(**values), version=VERSION,
                         description="Procedural shapes world: " + json.dumps(values))
        self.values = values

    def __getattr__(self, name):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)


def _validate(values: dict) -> None:
    minimum = dict(image_size=8, num_train=1, num_validation=1, num_test=1,
                   captions_per_image=1, seed=0, vocab_size=16)
    for key, low in minimum.items():
        v = values[key]
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
            raise ValueError(f"data.{key} must be an integer >= {low}, got {v!r}")


def config_name(*, image_size, num_train, num_validation, num_test, captions_per_image, seed,
                vocab_size) -> str:
    return (f"s{image_size}_n{num_train}-{num_validation}-{num_test}_c{captions_per_image}"
            f"_seed{seed}_v{vocab_size}")


class VlpShapes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the shapes world (registered as 'vlp_shapes')."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = []         # configs are made from data configs (`builder_config`)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """No code folder (no checksums or metadata files); TFDS's default lookup imports
        `importlib_resources`, which this stack lacks."""
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        s = c.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural coloured shapes with truthful captions (vlp_jax).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                "captions": tfds.features.Sequence(tfds.features.Text(),
                                                   length=c.captions_per_image),
                "label": tfds.features.ClassLabel(names=list(shapes_world.CLASS_NAMES)),
                "scene": tfds.features.Text(),
            }),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        c = self.builder_config
        sizes = dict(train=c.num_train, validation=c.num_validation, test=c.num_test)
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict]]:
        c = self.builder_config
        for i in range(num):
            ex = example(c.seed, split, i, c.image_size, c.captions_per_image)
            yield i, dict(ex, image=_png(ex["image"]), scene=json.dumps(ex["scene"]))


def example(seed: int, split: str, index: int, image_size: int, captions_per_image: int) -> dict:
    """Example `index` of `split`: {'image' uint8 [S, S, 3], 'captions', 'label', 'scene'}."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    return shapes_world.make_example(rng, image_size, captions_per_image)


def split_captions(seed: int, split: str, num: int, captions_per_image: int) -> list[str]:
    """All captions of a split, without rendering (same draws as `example`)."""
    out = []
    for i in range(num):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
        scene = shapes_world.sample_scene(rng)
        out.extend(shapes_world.describe_many(scene, rng, captions_per_image))
    return out


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ----------------------------------------------------------------------------- public API

def data_dir(data_config: ml_collections.ConfigDict) -> str:
    """The TFDS data dir: data.data_dir, else $VLP_JAX_DATA_DIR, else ~/.cache/vlp_jax/..."""
    d = resolve_part("data", data_config).data_dir or os.environ.get("VLP_JAX_DATA_DIR") \
        or DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(d))


def builder_config(data_config: ml_collections.ConfigDict) -> ShapesConfig:
    data_config = resolve_part("data", data_config)   # data.name is a declared one ('shapes')
    return ShapesConfig(**{k: data_config[k] for k in _SIZE_FIELDS})


def get_builder(data_config: ml_collections.ConfigDict) -> VlpShapes:
    """The builder (built or not) for this data config."""
    return VlpShapes(config=builder_config(data_config), data_dir=data_dir(data_config),
                     file_format="array_record")


def tokenizer_path(builder: VlpShapes) -> str:
    return os.path.join(os.fspath(builder.data_dir), TOKENIZER_FILE)


def is_built(builder: VlpShapes) -> bool:
    """True only for a finished build: TFDS files renamed into place and spm.model present."""
    return builder.is_prepared() and os.path.exists(tokenizer_path(builder))


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(builder: VlpShapes) -> None:
    """Deletes what interrupted builds left (we hold the lock and the build is not prepared):
    TFDS's temporary directories and a version directory without dataset_info.json."""
    final = os.fspath(builder.data_dir).rstrip("/")
    for path in glob.glob(os.path.join(os.path.dirname(final), "incomplete.*")) + [final]:
        shutil.rmtree(path, ignore_errors=True)


def _write_tokenizer(builder: VlpShapes) -> None:
    c = builder.builder_config
    n = min(c.num_train, max(1, TOKENIZER_SENTENCES // c.captions_per_image))
    sentences = split_captions(c.seed, "train", n, c.captions_per_image)
    sentences += [t.format(name) for name in shapes_world.CLASS_NAMES
                  for t in shapes_world.PROMPT_TEMPLATES]
    model = train_tokenizer(sentences, c.vocab_size)
    path = tokenizer_path(builder)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_built(data_config: ml_collections.ConfigDict) -> VlpShapes:
    """Builds the dataset and tokenizer if absent (idempotent, process-safe); returns the
    builder of the finished dataset."""
    builder = get_builder(data_config)
    if is_built(builder):
        return builder
    lock = os.path.join(data_dir(data_config), f".vlp_shapes.{builder.builder_config.name}.lock")
    with _file_lock(lock):
        builder = get_builder(data_config)           # another process may have finished it
        if not builder.is_prepared():
            _remove_leftovers(builder)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
            builder = get_builder(data_config)
        if not os.path.exists(tokenizer_path(builder)):
            _write_tokenizer(builder)
    return builder


def load_tokenizer(data_config: ml_collections.ConfigDict) -> Tokenizer:
    """The dataset's sentencepiece tokenizer (building the dataset first if needed)."""
    return Tokenizer(tokenizer_path(ensure_built(data_config)))
