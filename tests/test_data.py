"""The shapes world, its TFDS builder and the grain pipeline."""
import copy
import glob
import json
import os
import threading

import numpy as np
import pytest

from vlp_jax.data import pipeline, preprocess, shapes_builder
from vlp_jax.data import shapes_world as w

RELATION_WORD = {"left": "left of", "right": "right of", "above": "above", "over": "above",
                 "below": "below", "under": "below", "beneath": "below"}
SIZE_WORD = {v: k for k, vs in w.SIZE_WORDS.items() for v in vs}


def _scenes(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [w.sample_scene(rng) for _ in range(n)], rng


def parse(caption):
    """(objects [(size or None, colour, shape)], relations [canonical]) in caption order."""
    words = caption.replace(",", " ").replace(".", " ").replace(":", " ").split()
    objects, relations = [], []
    for i, word in enumerate(words):
        if word in w.COLOURS:
            assert words[i + 1] in w.SHAPES, caption
            objects.append((SIZE_WORD.get(words[i - 1]), word, words[i + 1]))
        elif word in RELATION_WORD:
            relations.append(RELATION_WORD[word])
    return objects, relations


# ----------------------------------------------------------------------------- world

def test_scenes_are_deterministic_json_and_well_formed():
    scenes, _ = _scenes()
    assert scenes == _scenes()[0] and scenes != _scenes(seed=1)[0]
    for scene in scenes:
        assert json.loads(json.dumps(scene)) == scene
        objs = scene["objects"]
        assert 1 <= len(objs) <= 3
        if len(objs) > 1:   # the main object is the unique large (and largest) one
            assert [o["size"] for o in objs] == ["large"] + ["small"] * (len(objs) - 1)
            assert objs[0]["r"] > max(o["r"] for o in objs[1:])
        for o in objs:
            assert o["r"] + 0.04 < o["x"] < 1 - o["r"] - 0.04
            assert o["r"] + 0.04 < o["y"] < 1 - o["r"] - 0.04
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                a, b = objs[i], objs[j]
                assert np.hypot(a["x"] - b["x"], a["y"] - b["y"]) > a["r"] + b["r"]
    assert {len(s["objects"]) for s in scenes} == {1, 2, 3}
    assert len(w.CLASS_NAMES) == len(set(w.CLASS_NAMES)) == 40
    assert all("{}" in t for t in w.PROMPT_TEMPLATES)


@pytest.mark.parametrize("size", [16, 24, 64])
def test_render(size):
    scenes, _ = _scenes(4)
    images = [w.render(s, size) for s in scenes]
    assert all(im.shape == (size, size, 3) and im.dtype == np.uint8 for im in images)
    np.testing.assert_array_equal(w.render(scenes[0], size), images[0])
    assert not np.array_equal(images[0], images[1])
    obj = scenes[0]["objects"][0]              # the main object's colour is at its centre
    px = w.render({**scenes[0], "objects": [obj]}, size)[int(obj["y"] * size),
                                                          int(obj["x"] * size)]
    assert np.abs(px.astype(int) - obj["rgb"]).max() <= 2


def test_captions_describe_their_scenes():
    scenes, rng = _scenes()
    for scene in scenes:
        objs = scene["objects"]
        captions = w.describe_many(scene, rng, 5)
        assert len(captions) == 5
        for caption in captions + [w.canonical_caption(scene)]:
            parsed, relations = parse(caption)
            assert [(c, s) for _, c, s in parsed] == [(o["colour"], o["shape"]) for o in objs]
            assert all(size in (None, o["size"]) for (size, _, _), o in zip(parsed, objs))
            assert relations in ([], [r["relation"] for r in scene["relations"]]), caption
            for rel, other in zip(relations, objs[1:]):
                main = objs[0]
                assert {"left of": main["x"] < other["x"], "right of": main["x"] > other["x"],
                        "above": main["y"] < other["y"], "below": main["y"] > other["y"]}[rel]
        main = objs[0]
        assert w.scene_label(scene) == w.CLASS_NAMES.index(f"{main['colour']} {main['shape']}")
    assert len({c for s in scenes[:50] for c in w.describe_many(s, rng, 5)}) > 200


def test_hard_negatives_differ_in_exactly_the_declared_way():
    scenes, _ = _scenes()
    kinds_seen = set()
    for scene in scenes:
        before = copy.deepcopy(scene)
        truth = w.canonical_caption(scene).rstrip(".").split()
        negatives = w.hard_negatives(scene)
        assert scene == before                                    # pure
        if len(scene["objects"]) == 1:
            assert negatives == []
        for caption, kind in negatives:
            kinds_seen.add(kind)
            neg = caption.rstrip(".").split()
            assert len(neg) == len(truth)
            diff = [i for i, (a, b) in enumerate(zip(truth, neg)) if a != b]
            if kind == "relation":
                assert len(diff) == 1
                a, b = truth[diff[0]], neg[diff[0]]
                assert {a, b} in ({"left", "right"}, {"above", "below"})
            else:
                vocab = {"colour": w.COLOURS, "shape": w.SHAPES, "size": w.SIZES}[kind]
                assert len(diff) == 2
                i, j = diff
                assert truth[i] in vocab and (neg[i], neg[j]) == (truth[j], truth[i])
    assert kinds_seen == set(w.SWAP_KINDS)
    with pytest.raises(ValueError, match="'texture'"):
        w.swap_attributes(scenes[0], "texture")


# ----------------------------------------------------------------------------- builder

def _tiny(data_dir, **kw):
    return pipeline.tiny_data_config(data_dir=str(data_dir), image_size=16, num_train=64,
                                     num_validation=16, num_test=16, **kw)


def _files(builder):
    paths = sorted(glob.glob(os.path.join(os.fspath(builder.data_dir), "*array_record*")))
    paths.append(shapes_builder.tokenizer_path(builder))
    return {os.path.basename(p): open(p, "rb").read() for p in paths}


def test_builds_are_deterministic_and_seeded(tmp_path):
    a = _files(shapes_builder.ensure_built(_tiny(tmp_path / "a")))
    b = _files(shapes_builder.ensure_built(_tiny(tmp_path / "b")))
    c = _files(shapes_builder.ensure_built(_tiny(tmp_path / "c", seed=1)))
    assert len(a) == 4 and a == b
    train = [k for k in a if "train" in k]
    assert train and all(a[k] != c[k] for k in train)


def test_build_is_idempotent_and_recovers_from_interruptions(tmp_path):
    config = _tiny(tmp_path)
    builder = shapes_builder.ensure_built(config)
    spm = shapes_builder.tokenizer_path(builder)
    stamp = os.path.getmtime(os.path.join(os.fspath(builder.data_dir), "dataset_info.json"))
    assert shapes_builder.is_built(shapes_builder.ensure_built(config))
    assert os.path.getmtime(os.path.join(os.fspath(builder.data_dir), "dataset_info.json")) == stamp
    model = open(spm, "rb").read()
    os.remove(spm)                                   # killed before the tokenizer was written
    assert not shapes_builder.is_built(shapes_builder.get_builder(config))
    shapes_builder.ensure_built(config)
    assert open(spm, "rb").read() == model
    version_dir = os.fspath(builder.data_dir)        # killed mid-write: temp dir, partial dir
    leftover = os.path.join(os.path.dirname(version_dir), "incomplete.ABC123_1.0.0")
    os.makedirs(leftover)
    os.remove(os.path.join(version_dir, "dataset_info.json"))
    shapes_builder.ensure_built(config)
    assert shapes_builder.is_built(shapes_builder.get_builder(config))
    assert not os.path.exists(leftover) and open(spm, "rb").read() == model


def test_racing_builds_are_safe(tmp_path):
    config, errors, builders = _tiny(tmp_path, seed=3), [], []

    def build():
        try:
            builders.append(shapes_builder.ensure_built(config))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(builders) == 2
    assert shapes_builder.is_built(builders[0])


def test_stored_examples_match_the_world_and_splits_are_disjoint(shapes_data_config):
    c = shapes_data_config
    train = list(pipeline.iterate_split(c, "train"))
    val = list(pipeline.iterate_split(c, "validation"))
    assert (len(train), len(val)) == (c.num_train, c.num_validation)
    for i in (0, 7, len(train) - 1):
        ex = shapes_builder.example(c.seed, "train", i, c.image_size, c.captions_per_image)
        np.testing.assert_array_equal(train[i]["image"], ex["image"])
        assert train[i]["captions"] == ex["captions"] and train[i]["scene"] == ex["scene"]
        assert train[i]["label"] == ex["label"] == w.scene_label(ex["scene"])
    keys = lambda rows: {json.dumps(r["scene"], sort_keys=True) for r in rows}  # noqa: E731
    assert not keys(train) & keys(val)
    tok = shapes_builder.load_tokenizer(c)
    longest = max(tok.token_count(t) for r in train for t in r["captions"])
    assert longest <= c.text_length                  # no stored caption is truncated


# ----------------------------------------------------------------------------- pipeline

def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(batches_a, batches_b):
    return all(a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
               for a, b in zip(batches_a, batches_b))


def test_batches_follow_the_contract(shapes_data_config):
    c = shapes_data_config
    c.augment = False
    batch = next(pipeline.make_train_iterator(c, global_batch_size=32, seed=0))
    assert sorted(batch) == ["image", "label", "text"]
    s, L = c.image_size, c.text_length
    assert batch["image"].shape == (32, s, s, 3) and batch["image"].dtype == np.float32
    assert batch["text"].shape == (32, L) and batch["text"].dtype == np.int32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert -1 <= batch["image"].min() < batch["image"].max() <= 1
    tok = shapes_builder.load_tokenizer(c)
    by_image = {r["image"].tobytes(): r for r in pipeline.iterate_split(c, "train")}
    for image, text, label in zip(batch["image"], batch["text"], batch["label"]):
        row = by_image[np.round((image + 1) * 127.5).astype(np.uint8).tobytes()]
        assert label == row["label"]
        assert any((tok.encode([t], L)[0] == text).all() for t in row["captions"])


def test_iterator_is_deterministic_and_resumes_exactly(shapes_data_config):
    c = shapes_data_config
    c.two_views, c.all_captions = True, True
    make = lambda seed: pipeline.make_train_iterator(c, global_batch_size=16, seed=seed)  # noqa
    it = make(0)
    first = _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    rest = _take(it, 3)
    assert _equal(first + rest, _take(make(0), 5))
    assert not np.array_equal(first[0]["image"], next(make(1))["image"])
    resumed = make(0)
    resumed.set_state(state)
    assert _equal(_take(resumed, 3), rest)
    b = rest[0]
    assert b["image2"].shape == b["image"].shape and not np.array_equal(b["image"], b["image2"])
    assert b["captions"].shape == (16, c.captions_per_image, c.text_length)
    assert all(any((row == t).all() for row in caps) for caps, t in zip(b["captions"], b["text"]))
    other = pipeline.make_train_iterator(c, global_batch_size=32, seed=0)
    with pytest.raises(ValueError, match="local_batch"):
        other.set_state(state)


def test_memoised_records_change_nothing_the_pipeline_yields(shapes_data_config):
    """Decoded records kept in memory (data.cache_mb) give the same batches, epoch after epoch,
    as decoding every read; the memo stops taking records when its budget is spent."""
    from vlp_jax.data.memo import MemoisedSource, record_nbytes
    c = shapes_data_config
    c.all_captions = True
    steps = 2 * c.num_train // 64 + 1                 # into a third epoch
    cached = _take(pipeline.make_train_iterator(c, global_batch_size=64, seed=3), steps)
    c.cache_mb = 0
    assert _equal(cached, _take(pipeline.make_train_iterator(c, global_batch_size=64, seed=3),
                                steps))
    source = shapes_builder.ensure_built(c).as_data_source("train")
    size = record_nbytes(source[0])
    memo = MemoisedSource(source, budget_bytes=int(2.5 * size))
    first = [memo[i] for i in range(4)]
    assert len(memo._records) == 2 and memo.used <= memo.budget
    assert memo[0] is first[0] and memo[3] is not first[3]        # kept / decoded again
    np.testing.assert_array_equal(memo[3]["image"], first[3]["image"])
    assert not MemoisedSource(source, 0)._records and len(MemoisedSource(source, 0)) == len(source)


def test_process_shards_are_disjoint_and_cover_the_data(shapes_data_config):
    c = shapes_data_config
    c.augment = False
    seen = []
    for index in range(2):
        it = pipeline.make_train_iterator(c, global_batch_size=32, seed=0, process_index=index,
                                          process_count=2)
        epoch = np.concatenate([b["image"] for b in _take(it, c.num_train // 32)])
        seen.append({np.round((x + 1) * 127.5).astype(np.uint8).tobytes() for x in epoch})
        assert len(seen[-1]) == c.num_train // 2        # a full epoch of this shard, no repeats
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {r["image"].tobytes() for r in pipeline.iterate_split(c, "train")}


def test_bad_batch_sizes_raise(shapes_data_config):
    with pytest.raises(ValueError, match="global_batch_size 30 .* process_count 4"):
        pipeline.make_train_iterator(shapes_data_config, global_batch_size=30, seed=0,
                                     process_count=4)
    with pytest.raises(ValueError, match="process_index 2"):
        pipeline.make_train_iterator(shapes_data_config, global_batch_size=4, seed=0,
                                     process_index=2, process_count=2)
    with pytest.raises(ValueError, match="unknown data config fields"):
        pipeline.tiny_data_config(image_sise=16)


def test_rewrites_join_the_caption_candidates(shapes_data_config, tmp_path):
    from vlp_jax.data.rewrites import write_rewrites
    path = str(tmp_path / "rewrites.jsonl")
    write_rewrites(path, [{"index": i, "rewrites": ["a shape on a dark background."]}
                          for i in range(shapes_data_config.num_train)])
    c = shapes_data_config
    c.all_captions, c.rewrites_path = True, path
    batch = next(pipeline.make_train_iterator(c, global_batch_size=8, seed=0))
    k = c.captions_per_image
    assert batch["captions"].shape == (8, 2 * k, c.text_length)
    rewrite = shapes_builder.load_tokenizer(c).encode(["a shape on a dark background."],
                                                       c.text_length)[0]
    assert all((caps[k] == rewrite).all() and (caps[k + 1:] == 0).all()
               for caps in batch["captions"])


def test_augmentation_keeps_left_and_right():
    rng = np.random.default_rng(0)
    scene = {"objects": [{"shape": "circle", "colour": "white", "size": "large", "x": 0.3,
                          "y": 0.5, "r": 0.17, "rgb": [240, 240, 240]}],
             "background": {"kind": "flat", "rgb": [10, 10, 10], "rgb2": [10, 10, 10],
                            "angle": 0.0, "noise_seed": 0}, "relations": []}
    image = w.render(scene, 32)
    np.testing.assert_allclose(preprocess.crop_and_resize(preprocess.normalize(image), 1, 0, 0),
                               preprocess.normalize(image), atol=1e-5)   # resampling sums
    for _ in range(20):
        x = preprocess.augment_image(image, rng)
        assert x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
        cols = np.nonzero((x.mean(-1) > 0.3).any(0))[0]
        assert 0.1 * 32 < cols.mean() < 0.45 * 32           # still on the left, not flipped
        assert np.ptp(x[..., 0] - x[..., 2]) < 0.2          # grey stays grey: no hue change


def test_eval_set(shapes_data_config):
    c = shapes_data_config
    ev = pipeline.load_eval_set(c, "validation", max_examples=50)
    assert len(ev) == 50 and ev.images.shape == (50, c.image_size, c.image_size, 3)
    assert ev.images.dtype == np.float32 and -1 <= ev.images.min() < ev.images.max() <= 1
    assert all(len(caps) == c.captions_per_image for caps in ev.captions)
    assert [w.scene_label(s) for s in ev.scenes] == ev.labels.tolist()
    assert list(ev.class_names) == list(w.CLASS_NAMES) and ev.prompt_templates
    assert len(pipeline.load_eval_set(c, "test")) == c.num_test
    with pytest.raises(ValueError, match="'valid'"):
        pipeline.load_eval_set(c, "valid")


def test_vlt5_records_count_truncation_of_their_task_texts_only(shapes_data_config):
    """With data.text_tasks='vlt5' the task's target replaces the drawn caption, so a caption
    too long for text_length is neither encoded nor counted as truncated; as captions it is."""
    from vlp_jax.data import shapes_builder as sb
    tokenizer = sb.load_tokenizer(shapes_data_config)
    long_caption = " ".join(["a red circle left of a blue square"] * 20)
    records = [dict(image=np.zeros((24, 24, 3), np.uint8), captions=[long_caption], label=0,
                    scene=json.dumps(w.sample_scene(np.random.default_rng(s))))
               for s in range(8)]
    counts = {}
    for tasks in ("captions", "vlt5"):
        c = copy.deepcopy(shapes_data_config)
        c.update(text_tasks=tasks, text_length=64)
        it = pipeline.make_train_iterator(c, global_batch_size=8, seed=0, source=records,
                                          tokenizer=tokenizer)
        batch = next(it)
        counts[tasks] = it.issue_totals()["truncated_caption"]
        assert ("prompt" in batch) == (tasks == "vlt5")
    assert counts == {"captions": 8, "vlt5": 0}, counts
