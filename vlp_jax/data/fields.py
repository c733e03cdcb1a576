"""Declared fields of `config.data` (see `vlp_jax.config_schema`; the readers are
data/pipeline.py, data/shapes_builder.py, data/preprocess.py, data/sources.py, data/photo.py,
data/array_record_source.py, data/tfds_source.py and train/data_bridge.py)."""
import dataclasses

from vlp_jax.config_schema import Field, Seq, declare
from vlp_jax.data.preprocess import AugmentConfig
from vlp_jax.data.task_fields import TEXT_TASKS

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
    text_tasks=Field(str, "captions", choices=TEXT_TASKS,
                     doc="fields made per example from the record's scene (data/task_fields.py): "
                         "'captions' none; 'vlt5' prompt (batch['text'] is its target); "
                         "'vqa' question, answer, answer_scores; 'snli_ve' hypothesis, ve_label; "
                         "'nlvr2' images (a pair), statement, nlvr2_label; 'grounding' "
                         "phrase, box, region (of the augmented view)"),
    num_caption_candidates=Field(int, 0, doc="K of batch['captions']; 0: captions_per_image, "
                                                "doubled when rewrites are given"),
    rewrites_path=Field(str, None, doc="JSON-lines caption rewrites (LaCLIP)"),
    worker_count=Field(int, 0, doc="grain worker processes (0: in-process)"),
    read_threads=Field(int, None, doc="threads reading ahead in this process; None: 0 for "
                                      "decoded records (the shapes world, whose pipeline holds "
                                      "the GIL: 2 threads measured 2x slower per example), 2 "
                                      "for photos (decoding releases the GIL) "
                                      "(`pipeline.read_threads`)"),
    prefetch_batches=Field(int, 2, doc="batches read ahead (with read_threads > 0)"),
    cache_mb=Field(int, None, doc="decoded train records kept in memory, MiB per process "
                                  "(vlp_jax/data/memo.py; 0: decode every read; None: "
                                  "512). Random-access sources only: an error on webdataset "
                                  "streams, which read each record once per pass"),
    **{f"augment_{f.name}": Field(float, f.default, doc=f"AugmentConfig.{f.name}")
       for f in dataclasses.fields(AugmentConfig)},
)

# Sources read from files (vlp_jax/data/sources.py): they take the fields above (those about
# the pipeline; the shapes world's sizes and seed are unused) and these.
_FILE_SOURCE_FIELDS = dict(
    train_path=Field(str, None, doc="training annotation file (or image folder)"),
    val_path=Field(str, None, doc="validation annotation file; None: the train file's 'val' "
                                  "split (Karpathy layout)"),
    test_path=Field(str, None, doc="test annotation file; None: the train file's 'test' split "
                                   "(Karpathy layout)"),
    zeroshot_path=Field(str, None, doc="image folder (one sub-folder per class) evaluated as "
                                       "split 'zeroshot'"),
    image_root=Field(str, None, doc="folder image paths are relative to; None: the annotation "
                                    "file's folder"),
    tokenizer=Field(str, "source", choices=("source", "shapes"),
                    doc="'source': sentencepiece trained on the training captions (cached); "
                        "'shapes': the shapes world's"),
    tokenizer_path=Field(str, None, doc="a sentencepiece .model file (overrides tokenizer)"),
    crop_scale_min=Field(float, 0.9, doc="random-resized-crop area fraction, lower bound"),
    crop_scale_max=Field(float, 1.0, doc="random-resized-crop area fraction, upper bound"),
    hflip=Field(bool, False, doc="random horizontal flips in training (captions name "
                                 "left/right)"),
    image_mean=Field(Seq(float), (0.5, 0.5, 0.5), doc="per-channel mean of x / 255"),
    image_std=Field(Seq(float), (0.5, 0.5, 0.5), doc="per-channel std of x / 255"),
    prompt_templates=Field(Seq(str), ("a photo of a {}.", "a picture of a {}.",
                                      "an image of a {}.", "a photo of the {}.",
                                      "a close-up photo of a {}.", "a cropped photo of a {}."),
                           doc="zero-shot prompts (and image-folder captions), one '{}' each"),
)
declare("data", "coco_json", extends="shapes", **_FILE_SOURCE_FIELDS)
declare("data", "image_folder", extends="shapes", **_FILE_SOURCE_FIELDS)
declare("data", "csv", extends="shapes", **_FILE_SOURCE_FIELDS,
        csv_img_key=Field(str, "filepath", doc="column of image paths"),
        csv_caption_key=Field(str, "title", doc="column of captions"),
        csv_separator=Field(str, None, doc="None: tab for .tsv files, ',' otherwise"))

# webdataset tar shards (vlp_jax/data/webdataset_source.py): a stream, not a listing.
_WEBDATASET_FIELDS = dict(
    {k: v for k, v in _FILE_SOURCE_FIELDS.items() if k != "image_root"},
    train_path=Field(str, None, doc="training shards: a brace pattern /d/{00000..00099}.tar, "
                                    "a comma-separated list, or one .tar"),
    val_path=Field(str, None, doc="validation shards (same forms), read fully in order"),
    test_path=Field(str, None, doc="test shards (same forms), read fully in order"),
    shuffle_buffer=Field(int, 1000, doc="examples in the training stream's shuffle buffer"),
    tokenizer_sample=Field(int, 100000, doc="training captions (the first ones of the shards) "
                                            "the sentencepiece tokenizer is trained on"),
)
declare("data", "webdataset", extends="shapes", **_WEBDATASET_FIELDS)

# A directory written by `vlp-jax data build` (vlp_jax/data/array_record_source.py).
_ARRAY_RECORD_FIELDS = dict(
    {k: _FILE_SOURCE_FIELDS[k] for k in ("crop_scale_min", "crop_scale_max", "hflip",
                                         "image_mean", "image_std", "prompt_templates")},
    path=Field(str, None, doc="directory written by `vlp-jax data build` (manifest.json, "
                              "<split>-*.array_record, tokenizer.model)"),
    zeroshot_path=Field(str, None, doc="image folder, or a directory built from one, evaluated "
                                       "as split 'zeroshot'"),
    tokenizer_path=Field(str, None, doc="a sentencepiece .model file; None: the directory's "
                                        "tokenizer.model"),
)
declare("data", "array_record", extends="shapes", **_ARRAY_RECORD_FIELDS)

# A prepared TFDS dataset read with tfds.data_source (vlp_jax/data/tfds_source.py).
_TFDS_FIELDS = dict(
    {k: v for k, v in _FILE_SOURCE_FIELDS.items()
     if k not in ("train_path", "val_path", "test_path", "image_root")},
    tfds_name=Field(str, None, doc="TFDS name[/config][:version], prepared as array_record"),
    tfds_data_dir=Field(str, None, doc="TFDS data dir; None: TFDS's default"),
    tfds_image_key=Field(str, "image", doc="image feature ('/' for nested features)"),
    tfds_text_key=Field(str, "caption", doc="caption feature: a text or a sequence of texts"),
    tfds_label_key=Field(str, None, doc="class-label feature (ClassLabel names -> zero-shot); "
                                        "None: labels -1"),
    tfds_train_split=Field(str, "train", doc="TFDS split (or slice) trained on"),
    tfds_val_split=Field(str, "validation", doc="TFDS split of 'validation'; None: none"),
    tfds_test_split=Field(str, "test", doc="TFDS split of 'test'; None: none"),
    tokenizer_sample=_WEBDATASET_FIELDS["tokenizer_sample"],
)
declare("data", "tfds", extends="shapes", **_TFDS_FIELDS)
