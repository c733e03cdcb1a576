"""Data read from files (vlp_jax.data.sources, vlp_jax.data.photo, the DataBridge's file
sources, experiments/clip_own_data.py): shapes-world scenes rendered to PNG / JPEG files with
COCO-captions, Karpathy, CSV / TSV annotations and an image folder, all written here."""
import csv
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from vlp_jax.config_schema import ConfigError, resolve_part
from vlp_jax.data import photo, preprocess, sanitize, sources
from vlp_jax.data import shapes_world as w
from vlp_jax.train.data_bridge import DataBridge

SIZE = 32


def _scene_files(folder, n, seed, fmt="png", image_size=SIZE, captions=3):
    """Renders n scenes to <folder>/<i>.<fmt>; returns [(file name, captions, label)]."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = w.sample_scene(rng)
        name = f"{i:05d}.{fmt}"
        Image.fromarray(w.render(scene, image_size)).save(os.path.join(folder, name))
        out.append((name, w.describe_many(scene, rng, captions), w.scene_label(scene)))
    return out


def write_coco(path, items, image_dir="images"):
    """COCO-captions JSON of [(file name, captions, label)] with images under image_dir."""
    images = [{"id": 100 + i, "file_name": f"{image_dir}/{name}"}
              for i, (name, _, _) in enumerate(items)]
    anns = [{"id": len(images) * j + i, "image_id": 100 + i, "caption": c}
            for i, (_, caps, _) in enumerate(items) for j, c in enumerate(caps)]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return path


def write_image_folder(root, n, seed, image_size=SIZE):
    """<root>/<class name with _>/<i>.png of n scenes, by their main-object class."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = w.sample_scene(rng)
        folder = os.path.join(root, w.CLASS_NAMES[w.scene_label(scene)].replace(" ", "_"))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(w.render(scene, image_size)).save(os.path.join(folder, f"{i:05d}.png"))
    return root


def file_config(**fields):
    base = dict(name="coco_json", image_size=SIZE, text_length=32, vocab_size=128)
    return resolve_part("data", dict(base, **fields))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Train (96, PNG) and val (32, JPEG) images with COCO JSON files, plus a data dir."""
    root = tmp_path_factory.mktemp("world")
    train = _scene_files(str(root / "images"), 96, seed=1)
    val = _scene_files(str(root / "val_images"), 32, seed=2, fmt="jpg")
    write_coco(str(root / "train.json"), train)
    write_coco(str(root / "val.json"), val, image_dir="val_images")
    return dict(root=str(root), train=train, val=val, data_dir=str(root / "cache"))


# ----------------------------------------------------------------------------- readers

def test_coco_captions_reader_groups_captions_per_image_and_resolves_paths(world):
    listing = sources.read_listing("coco_json", os.path.join(world["root"], "train.json"),
                                   "train", file_config())
    assert len(listing.entries) == 96 and not listing.has_splits
    for entry, (name, caps, _) in zip(listing.entries, world["train"]):
        assert entry.path == os.path.join(world["root"], "images", name)
        assert entry.captions == tuple(caps) and entry.issue is None
    other = sources.read_listing("coco_json", os.path.join(world["root"], "train.json"),
                                 "train", file_config(image_root="/elsewhere"))
    assert other.entries[0].path == "/elsewhere/images/00000.png"


def test_karpathy_reader_selects_the_split_by_name_and_counts_restval_as_train(world, tmp_path):
    splits = ["train", "restval", "val", "test"] * 8
    doc = {"images": [{"filepath": "images", "filename": name, "split": splits[i],
                       "sentences": [{"raw": c} for c in caps]}
                      for i, (name, caps, _) in enumerate(world["train"][:32])]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(doc))
    config = file_config(image_root=world["root"])
    got = {s: sources.read_listing("coco_json", str(path), s, config)
           for s in ("train", "validation", "test")}
    assert [len(got[s].entries) for s in ("train", "validation", "test")] == [16, 8, 8]
    assert all(listing.has_splits for listing in got.values())
    assert got["validation"].entries[0].path == os.path.join(world["root"], "images",
                                                             world["train"][2][0])
    assert got["train"].entries[1].captions == tuple(world["train"][1][1])   # restval
    no_filepath = {"images": [{"filename": "images/00000.png", "split": "test",
                               "sentences": [{"raw": "a red circle."}]}]}
    path.write_text(json.dumps(no_filepath))
    entry = sources.read_listing("coco_json", str(path), "test", config).entries[0]
    assert entry.path == os.path.join(world["root"], "images", "00000.png")


@pytest.mark.parametrize("ext,sep,override", [(".csv", ",", None), (".tsv", "\t", None),
                                              (".txt", ";", ";")])
def test_csv_reader_uses_the_named_columns_and_separator(world, tmp_path, ext, sep, override):
    path = tmp_path / f"pairs{ext}"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(["image", "text", "other"])
        for name, caps, _ in world["train"][:10]:
            for c in caps[:2]:
                writer.writerow([os.path.join(world["root"], "images", name), c, "x"])
    config = file_config(name="csv", csv_img_key="image", csv_caption_key="text",
                         csv_separator=override)
    listing = sources.read_listing("csv", str(path), "train", config)
    assert len(listing.entries) == 10
    assert listing.entries[3].captions == tuple(world["train"][3][1][:2])
    with pytest.raises(sources.SourceError, match=r"pairs.*no column\(s\) \['filepath'"):
        sources.read_listing("csv", str(path), "train",
                             file_config(name="csv", csv_separator=override))


def test_image_folder_gives_class_names_labels_and_prompt_captions(tmp_path):
    root = write_image_folder(str(tmp_path / "zs"), 40, seed=3)
    config = file_config(name="image_folder")
    listing = sources.read_listing("image_folder", root, "zeroshot", config)
    folders = sorted(os.listdir(root))
    assert list(listing.class_names) == [f.replace("_", " ") for f in folders]
    assert len(listing.entries) == 40
    for entry in listing.entries:
        name = listing.class_names[entry.label]
        assert os.path.basename(os.path.dirname(entry.path)) == name.replace(" ", "_")
        assert entry.captions[0] == f"a photo of a {name}."
    ds = sources.load_eval_set(listing, photo.photo_transform(config),
                               config.prompt_templates)
    assert ds.images.shape == (40, SIZE, SIZE, 3) and list(ds.class_names) == list(
        listing.class_names)
    assert ds.labels.tolist() == [e.label for e in listing.entries]
    assert ds.prompt_templates[0] == "a photo of a {}."


# ----------------------------------------------------------------------------- images

def test_eval_transform_resizes_the_shorter_side_and_centre_crops():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255                       # the centre square is white
    out = photo.resize_center_crop(image, 20)
    assert out.shape == (20, 20, 3)
    assert out[:, 1:-1].min() == 255 and out.min() > 200   # bicubic blends the outer columns
    tall = photo.resize_center_crop(np.zeros((90, 30, 3), np.uint8), 24)
    assert tall.shape == (24, 24, 3)


def test_random_resized_crop_boxes_keep_area_fraction_and_ratio_in_range():
    rng = np.random.default_rng(0)
    for h, w_ in [(100, 100), (60, 140), (200, 50)]:
        for _ in range(200):
            top, left, ch, cw = photo.random_crop_box(h, w_, rng, scale=(0.5, 0.9))
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w_
            fraction = ch * cw / (h * w_)
            if (h, w_) == (100, 100):       # square: every draw fits, no fallback
                assert 0.45 <= fraction <= 0.95 and 0.70 <= cw / ch <= 1.40


def test_default_train_transform_never_flips_and_normalises_like_the_shapes_pipeline():
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[:, :SIZE // 2] = 255                  # left half white
    t = photo.PhotoTransform(SIZE)              # defaults: scale (0.9, 1), no flip, 0.5 / 0.5
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = t.train(image, rng)
        assert out.shape == (SIZE, SIZE, 3)
        assert out[:, :4].mean() > 0.9 and out[:, -4:].mean() < -0.9
    np.testing.assert_allclose(t.eval(image), preprocess.normalize(image), rtol=1e-6, atol=1e-6)
    flipping = photo.PhotoTransform(SIZE, hflip=True)
    assert any(flipping.train(image, rng)[:, 0].mean() < 0 for _ in range(20))
    custom = photo.PhotoTransform(SIZE, mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25))
    np.testing.assert_allclose(custom.normalize(np.full((1, 1, 3), 255, np.uint8))[0, 0],
                               [1.0, 1.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("JPEG", "L"), ("WEBP", "RGB"),
                                      ("PNG", "RGBA")])
def test_photo_formats_decode_to_rgb(tmp_path, fmt, mode):
    import io
    img = Image.new(mode, (30, 20), 200 if mode == "L" else (200, 100, 50, 255)[:len(mode)])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out, flags = photo.PhotoTransform(SIZE).clean(buf.getvalue())
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert ("converted" in flags) == (mode != "RGB")
    assert abs(int(out[10, 15, 0]) - 200) <= 3


def test_photos_of_any_size_and_mode_are_cropped_to_the_training_size(tmp_path):
    """Non-square RGB JPEGs and greyscale PNGs of other sizes train at image_size; greyscale
    counts as converted_channels."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    items = []
    for i, (h, w_, mode) in enumerate([(48, 80, "RGB"), (90, 30, "L"), (33, 33, "RGB")] * 3):
        pixels = rng.integers(0, 256, (h, w_, 3) if mode == "RGB" else (h, w_), np.uint8)
        name = f"{i}.{'jpg' if mode == 'RGB' else 'png'}"
        Image.fromarray(pixels, mode).save(folder / name)
        items.append((name, [f"photo number {i}."], -1))
    path = write_coco(str(tmp_path / "photos.json"), items, image_dir="photos")
    bridge = DataBridge(file_config(train_path=path, data_dir=str(tmp_path / "cache"),
                                    read_threads=0))
    it = bridge.train_iterator(global_batch_size=9, seed=0)
    batch = next(it)
    assert batch["image"].shape == (9, SIZE, SIZE, 3) and batch["label"].tolist() == [-1] * 9
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert it.issue_totals()["converted_channels"] == 3
    assert it.issue_totals()["skipped_undecodable"] == 0
    ds = bridge.load_eval_set("train")
    assert ds.images.shape == (9, SIZE, SIZE, 3)


def test_an_image_folder_trains_on_its_class_prompts(tmp_path):
    root = write_image_folder(str(tmp_path / "classes"), 48, seed=6)
    bridge = DataBridge(file_config(name="image_folder", train_path=root, read_threads=0,
                                    data_dir=str(tmp_path / "cache")))
    names = bridge.train_listing.class_names
    batch = next(bridge.train_iterator(global_batch_size=16, seed=0))
    for label, text in zip(batch["label"].tolist(), bridge.detokenize(batch["text"])):
        assert names[label] in text, (names[label], text)


def test_the_shapes_tokenizer_can_be_chosen(shapes_data_dir, world):
    from vlp_jax.data.pipeline import tiny_data_config
    from vlp_jax.data.shapes_builder import load_tokenizer
    shapes = tiny_data_config(data_dir=shapes_data_dir)
    config = file_config(train_path=os.path.join(world["root"], "train.json"),
                         tokenizer="shapes", **{k: shapes[k] for k in (
                             "data_dir", "image_size", "num_train", "num_validation",
                             "num_test", "vocab_size", "text_length")})
    assert DataBridge(config).tokenizer.model_bytes == load_tokenizer(shapes).model_bytes
    assert not os.path.exists(os.path.join(shapes_data_dir, sources.TOKENIZER_DIR))


# ----------------------------------------------------------------------------- bad input

def _bad_world(world, tmp_path):
    """COCO JSON over 8 good images plus one bad record of each kind."""
    good = world["train"][:8]
    root = tmp_path
    images_dir = root / "images"
    images_dir.mkdir()
    for name, _, _ in good:
        os.link(os.path.join(world["root"], "images", name), images_dir / name)
    png = (images_dir / good[0][0]).read_bytes()
    (images_dir / "truncated.png").write_bytes(png[:len(png) // 2])
    (images_dir / "garbage.png").write_bytes(b"this is not an image")
    items = good + [("missing.png", ["a red circle."], 0), ("truncated.png", ["a cat."], 0),
                    ("garbage.png", ["a dog."], 0), (good[1][0], ["", "  "], 0)]
    path = write_coco(str(root / "bad.json"), items)
    doc = json.loads(open(path).read())
    doc["annotations"].append({"id": 999, "image_id": 12345, "caption": "an orphan."})
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def test_every_bad_record_kind_is_skipped_counted_and_named(world, tmp_path, caplog,
                                                           monkeypatch):
    from vlp_jax.data import pipeline
    monkeypatch.setattr(pipeline, "_skip_logs", [0])     # the first 20 skips of a process log
    path = _bad_world(world, tmp_path)
    bridge = DataBridge(file_config(train_path=path, data_dir=world["data_dir"],
                                    read_threads=0))
    it = bridge.train_iterator(global_batch_size=8, seed=0)
    with caplog.at_level(logging.WARNING):
        batches = [next(it) for _ in range(10)]             # exactly 10 epochs of good records
    assert batches[0]["image"].shape == (8, SIZE, SIZE, 3)
    assert batches[0]["image"].dtype == np.float32 and batches[0]["text"].shape == (8, 32)
    totals = it.issue_totals()
    # per epoch: missing, truncated, garbage (undecodable); orphan (malformed); empty caption.
    # Epochs 1-9 are consumed whole, epoch 10 up to its last good record.
    for kind, per_epoch in [("skipped_undecodable", 3), ("skipped_malformed", 1),
                            ("skipped_empty_caption", 1)]:
        assert 9 * per_epoch <= totals[kind] <= 10 * per_epoch, totals
    logged = caplog.text
    assert "missing.png: missing image file" in logged
    assert "truncated.png: undecodable image" in logged
    assert "garbage.png: undecodable image" in logged
    assert "image_id 12345, absent from 'images'" in logged


def test_eval_sets_skip_bad_records_with_a_warning(world, tmp_path, caplog):
    path = _bad_world(world, tmp_path)
    bridge = DataBridge(file_config(train_path=path, val_path=path, data_dir=world["data_dir"]))
    with caplog.at_level(logging.WARNING):
        ds = bridge.load_eval_set("validation")
    assert len(ds) == 8
    assert [list(c) for c in ds.captions] == [caps for _, caps, _ in world["train"][:8]]
    assert "missing.png: missing image file" in caplog.text
    assert "5 evaluation records skipped" in caplog.text


def test_bad_csv_rows_are_counted_and_skipped(world, tmp_path):
    good = world["train"][:8]
    path = tmp_path / "pairs.csv"
    lines = ["filepath,title"] + [f"{os.path.join(world['root'], 'images', n)},{c[0]}"
                                  for n, c, _ in good]
    body = ("\n".join(lines) + "\n").encode()
    body += os.path.join(world["root"], "images", good[1][0]).encode() + b",caf\xe9 latin-1\n"
    body += os.path.join(world["root"], "images", good[2][0]).encode() + b"\n"   # no caption
    path.write_bytes(body)
    config = file_config(name="csv", train_path=str(path), data_dir=world["data_dir"],
                         read_threads=0)
    listing = sources.read_listing("csv", str(path), "train", config)
    kinds = sorted(e.issue[0] for e in listing.entries if e.issue)
    assert kinds == ["skipped_malformed", "skipped_malformed"], listing.entries
    it = DataBridge(config).train_iterator(global_batch_size=8, seed=0)
    for _ in range(10):
        next(it)
    # the non-UTF-8 caption is grouped with its image's good one and the whole entry is
    # skipped: 7 good entries + 2 bad ones per epoch; 80 good records span 11 3/7 epochs
    assert 22 <= it.issue_totals()["skipped_malformed"] <= 24, it.issue_totals()


def test_sources_with_nothing_usable_or_malformed_files_fail_before_training(world, tmp_path):
    cache = world["data_dir"]
    missing = write_coco(str(tmp_path / "missing.json"), [("nope.png", ["a red circle."], 0)])
    with pytest.raises(sources.SourceError, match=r"missing.json: no usable"):
        DataBridge(file_config(train_path=missing, data_dir=cache))
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(sources.SourceError, match=r"broken.json: not a JSON"):
        DataBridge(file_config(train_path=str(tmp_path / "broken.json"), data_dir=cache))
    (tmp_path / "nokey.json").write_text(json.dumps(
        {"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(sources.SourceError, match=r"nokey.json: images\[0\] lacks the key "
                                                  r"'file_name'"):
        DataBridge(file_config(train_path=str(tmp_path / "nokey.json"), data_dir=cache))
    (tmp_path / "other.json").write_text(json.dumps({"pictures": []}))
    with pytest.raises(sources.SourceError, match=r"other.json: expected an object"):
        DataBridge(file_config(train_path=str(tmp_path / "other.json"), data_dir=cache))
    with pytest.raises(sources.SourceError, match=r"needs data.train_path"):
        DataBridge(file_config(data_dir=cache))
    train = os.path.join(world["root"], "train.json")
    bridge = DataBridge(file_config(train_path=train, data_dir=cache))
    with pytest.raises(sources.SourceError, match=r"needs data.val_path"):
        bridge.load_eval_set("validation")
    with pytest.raises(sources.SourceError, match=r"needs data.zeroshot_path"):
        bridge.load_eval_set("zeroshot")


def test_data_name_selects_a_registered_source():
    with pytest.raises(ConfigError, match=r"data.name 'parquet' is unknown; valid: .*"
                                          r"'coco_json', 'csv', 'image_folder', 'shapes'"):
        resolve_part("data", dict(name="parquet"))
    with pytest.raises(ConfigError, match=r"csv_img_key"):
        resolve_part("data", dict(name="coco_json", csv_img_key="x"))
    with pytest.raises(ValueError, match="already registered"):
        sources.register_source("csv")(lambda path, split, cfg: None)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_is_trained_on_the_training_captions_once_and_cached(world, tmp_path):
    cache = str(tmp_path / "cache")
    zs = write_image_folder(str(tmp_path / "zs"), 20, seed=4)
    config = file_config(train_path=os.path.join(world["root"], "train.json"), data_dir=cache,
                         zeroshot_path=zs)
    bridge = DataBridge(config)
    files = os.listdir(os.path.join(cache, sources.TOKENIZER_DIR))
    assert len(files) == 1 and files[0].endswith(".model")
    t = bridge.tokenizer
    caption = world["train"][0][1][0]
    assert t.decode(t.encode([caption], 32)[0]) == caption.lower()
    assert t.unk_id not in t.encode([caption], 32)[0]
    assert t.word_start.shape == (t.vocab_size,) and t.word_start.dtype == bool
    assert bridge.vocab()["word_start"].sum() > 10
    mtime = os.path.getmtime(os.path.join(cache, sources.TOKENIZER_DIR, files[0]))
    again = DataBridge(config)
    assert os.listdir(os.path.join(cache, sources.TOKENIZER_DIR)) == files
    assert os.path.getmtime(os.path.join(cache, sources.TOKENIZER_DIR, files[0])) == mtime
    assert again.tokenizer.model_bytes == t.model_bytes
    given = DataBridge(file_config(train_path=config.train_path, data_dir=str(tmp_path / "c2"),
                                   tokenizer_path=os.path.join(cache, sources.TOKENIZER_DIR,
                                                               files[0])))
    assert given.tokenizer.model_bytes == t.model_bytes
    assert not os.path.exists(os.path.join(tmp_path, "c2", sources.TOKENIZER_DIR))


def test_eval_sets_of_a_file_source(world, tmp_path):
    zs = write_image_folder(str(tmp_path / "zs"), 24, seed=5)
    bridge = DataBridge(file_config(train_path=os.path.join(world["root"], "train.json"),
                                    val_path=os.path.join(world["root"], "val.json"),
                                    zeroshot_path=zs, data_dir=world["data_dir"]))
    val = bridge.load_eval_set("validation", 20)
    assert len(val) == 20 and val.images.shape == (20, SIZE, SIZE, 3)
    assert [list(c) for c in val.captions] == [caps for _, caps, _ in world["val"][:20]]
    assert -1.0 <= val.images.min() and val.images.max() <= 1.0
    zero = bridge.load_eval_set("zeroshot")
    assert len(zero) == 24 and len(zero.class_names) >= 2
    assert bridge.example_shapes()["image"].shape == (1, SIZE, SIZE, 3)


# ----------------------------------------------------------------------------- end to end

def test_clip_own_data_learns_from_files_far_above_chance(tmp_path):
    """experiments/clip_own_data.py on COCO JSON files of rendered scenes (1,024 train, 128
    val, 256 zero-shot folder images at 24 px): a width-32, one-layer CLIP, 200 steps at
    batch 64 on one device, writes eval.json with retrieval and zero-shot metrics far above
    chance on the held-out images."""
    from tests.helpers import experiment_path, on_devices, shrink_towers
    from vlp_jax.config_args import load_config
    from vlp_jax.train.trainer import train_and_evaluate
    res, steps = 24, 200
    train = _scene_files(str(tmp_path / "data" / "images"), 1024, seed=10, image_size=res,
                         captions=5)
    val = _scene_files(str(tmp_path / "data" / "val_images"), 128, seed=11, fmt="jpg",
                       image_size=res)
    write_coco(str(tmp_path / "data" / "train.json"), train)
    write_coco(str(tmp_path / "data" / "val.json"), val, image_dir="val_images")
    zs = write_image_folder(str(tmp_path / "zeroshot"), 256, seed=12, image_size=res)
    arg = (f"train={tmp_path}/data/train.json,val={tmp_path}/data/val.json,"
           f"zeroshot={zs},res={res},steps={steps},batch=64,smoke")
    config = on_devices(load_config(experiment_path(f"clip_own_data.py:{arg}")), 1)
    assert config.data.name == "coco_json" and config.data.image_size == res
    config.data.data_dir = str(tmp_path / "cache")
    config.data.vocab_size = 256
    shrink_towers(config, config.data)
    config.optim.update(lr=3e-3, warmup_steps=10)
    config.train.update(log_every=50, checkpoint_every=steps)
    result = train_and_evaluate(config, str(tmp_path / "workdir"), progress=False)
    ev = json.loads((tmp_path / "workdir" / "eval.json").read_text())
    for key in ("zeroshot/top1", "zeroshot/top5", "retrieval/i2t_r1", "retrieval/t2i_r1",
                "retrieval/t2i_r10"):
        assert key in ev, sorted(ev)
    print({k: round(v, 2) for k, v in ev.items()}, result["data"])
    n_classes = len(os.listdir(zs))
    assert ev["zeroshot/chance"] == pytest.approx(100 / n_classes, rel=1e-3)
    assert ev["zeroshot/top1"] > 4 * ev["zeroshot/chance"], ev
    assert ev["retrieval/t2i_r10"] > 3 * 10 / 128 * 100, ev     # chance R@10 = 7.8%
    assert sum(result["data"].values()) == 0, result["data"]
