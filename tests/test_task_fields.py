"""The named fields of `data.text_tasks` (vqa / snli_ve / nlvr2 / vlt5 / grounding): batches
carry exactly the fields `task_fields.field_shapes` declares, their contents agree with the
shapes world, the pair task reads its right image from another record (a bad one is skipped
and counted), grounding boxes follow the view's crop, and the streams resume exactly."""
import numpy as np
import pytest

from vlp_jax.data import pipeline, sanitize, shapes_builder, shapes_tasks, task_fields
from vlp_jax.train.data_bridge import DataBridge

TASKS = task_fields.TEXT_TASKS


def _batch(config, task, size=16, seed=0):
    config.text_tasks = task
    bridge = DataBridge(config)
    return bridge, next(iter(bridge.train_iterator(size, seed=seed)))


@pytest.mark.parametrize("task", TASKS)
def test_batches_carry_exactly_the_declared_fields(shapes_data_config, task):
    bridge, batch = _batch(shapes_data_config, task)
    declared = task_fields.field_shapes(shapes_data_config)
    assert set(batch) == set(declared)
    for key, (shape, dtype) in declared.items():
        assert batch[key].shape == (16, *shape) and batch[key].dtype == dtype, key
    abstract = bridge.example_shapes()      # the initialisation batch is derived from them
    assert {"image", "text"} <= set(abstract) <= set(declared)
    for key, struct in abstract.items():
        assert struct.shape == (1, *declared[key][0]) and struct.dtype == declared[key][1]


def test_vqa_fields_agree_with_each_other(shapes_data_config):
    bridge, batch = _batch(shapes_data_config, "vqa", size=64)
    vocab = shapes_tasks.answer_vocabulary()
    answers = bridge.detokenize(batch["answer"])
    questions = bridge.detokenize(batch["question"])
    # One truthful answer per question: its 10 annotators agree, so it alone scores 1.
    np.testing.assert_array_equal(batch["answer_scores"].max(1), 1.0)
    assert (batch["answer_scores"] > 0).sum(1).tolist() == [1] * 64
    assert [vocab[i] for i in batch["answer_scores"].argmax(1)] == answers
    yes_no = [a for q, a in zip(questions, answers) if q.startswith(("is ", "are "))]
    assert yes_no and set(yes_no) <= {"yes", "no"}
    assert len(set(questions)) > 10


def test_snli_ve_and_nlvr2_labels_are_drawn_evenly(shapes_data_config):
    _, ve = _batch(shapes_data_config, "snli_ve", size=96)
    counts = np.bincount(ve["ve_label"], minlength=3)
    assert counts.min() > 15, counts                  # 32 each expected
    neutral = [h for h, y in zip(DataBridge(shapes_data_config).detokenize(ve["hypothesis"]),
                                 ve["ve_label"]) if y == 1]
    assert neutral
    _, pair = _batch(shapes_data_config, "nlvr2", size=96)
    assert 30 < pair["nlvr2_label"].sum() < 66, pair["nlvr2_label"].sum()


def test_nlvr2_pairs_this_image_with_another_record(shapes_data_config):
    _, batch = _batch(shapes_data_config, "nlvr2", size=32)
    np.testing.assert_array_equal(batch["images"][:, 0], batch["image"])
    differs = [not np.allclose(a, b) for a, b in batch["images"]]
    assert all(differs)
    assert len({x.tobytes() for x in batch["images"][:, 1]}) > 24     # many partners


def _grounding_example(config, augment: bool, seed: int):
    """(transform output, its record's scene, the resolved config) of one grounding example
    of train record `seed` (modulo the split's size), drawn with generator `seed`."""
    source = shapes_builder.ensure_built(config).as_data_source("train")
    config.update(text_tasks="grounding", augment=augment)
    config = pipeline.resolve_part("data", config)
    transform = pipeline._TrainTransform(config, shapes_builder.load_tokenizer(config), None)
    record = dict(source[seed % len(source)], index=seed % len(source))
    return transform(record, np.random.default_rng(seed)), task_fields.decode_scene(
        record["scene"]), config


def test_grounding_box_is_the_named_objects_in_the_view(shapes_data_config):
    """Unaugmented: the box is the phrase's object's bounding square and the region its grid
    cell. Augmented: the box moves with the view's crop exactly (a rectangle drawn in the image
    lands on the mapped box in the cropped view, to a pixel)."""
    from vlp_jax.data import preprocess, shapes_world
    tokenizer = None
    for seed in range(8):
        out, scene, config = _grounding_example(shapes_data_config.copy_and_resolve_references(),
                                                False, seed)
        tokenizer = tokenizer or shapes_builder.load_tokenizer(config)
        phrase = tokenizer.decode(out["phrase"][None])[0]
        [obj] = [o for o in scene["objects"]
                 if shapes_world.object_phrase(o, article="the") == phrase]
        expected = np.clip([obj["x"] - obj["r"], obj["y"] - obj["r"], obj["x"] + obj["r"],
                            obj["y"] + obj["r"]], 0, 1)
        np.testing.assert_allclose(out["box"], expected, atol=1e-6)
        regions = [r for row in shapes_tasks.REGIONS for r in row]
        assert regions[out["region"]] == shapes_tasks.region_of(obj["x"], obj["y"])
    size = 48
    image = np.zeros((size, size, 3), np.float32)
    x0, y0, x1, y1 = 14, 10, 26, 34
    image[y0:y1, x0:x1] = 1.0
    box = np.array([x0, y0, x1, y1]) / size
    rng = np.random.default_rng(0)
    for _ in range(20):
        draw = preprocess.draw_augment(rng, preprocess.AugmentConfig(0.7, 1.3, 0.1, 0, 0))
        view = preprocess.crop_and_resize(image, draw.scale, draw.shift_y, draw.shift_x)
        ys, xs = np.nonzero(view[..., 0] > 0.5)
        seen = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / size
        np.testing.assert_allclose(draw.map_boxes(box), seen, atol=1.01 / size)
    out, _, _ = _grounding_example(shapes_data_config, True, 0)
    assert out["box"].dtype == np.float32 and (out["box"][:2] < out["box"][2:]).all()


@pytest.mark.parametrize("task", ("vqa", "nlvr2", "grounding"))
def test_task_streams_resume_exactly(shapes_data_config, task):
    shapes_data_config.text_tasks = task
    make = lambda: pipeline.make_train_iterator(shapes_data_config, global_batch_size=8, seed=3)
    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = make()
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(2)]):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_bad_partner_skips_the_example_and_is_counted(shapes_data_config):
    source = shapes_builder.ensure_built(shapes_data_config).as_data_source("train")
    good, bad = dict(source[0]), dict(source[1], image=b"not an image")
    shapes_data_config.text_tasks = "nlvr2"
    config = pipeline.resolve_part("data", shapes_data_config)
    tokenizer = shapes_builder.load_tokenizer(config)
    transform = pipeline._TrainTransform(config, tokenizer, None, pair_source=[good, bad])
    out = transform(dict(good, index=0), np.random.default_rng(0))   # its only partner: bad
    assert out[pipeline.SKIP_KEY]
    assert sanitize.issue_dict(out["data_issues"])["skipped_undecodable"] == 1
    out = pipeline._TrainTransform(config, tokenizer, None, pair_source=[good, good])(
        dict(good, index=0), np.random.default_rng(0))
    assert pipeline.SKIP_KEY not in out and out["images"].shape[0] == 2


def test_tasks_need_scenes_and_known_names(shapes_data_config):
    source = shapes_builder.ensure_built(shapes_data_config).as_data_source("train")
    plain = [{k: v for k, v in dict(source[i]).items() if k != "scene"} for i in range(8)]
    shapes_data_config.text_tasks = "snli_ve"
    tokenizer = shapes_builder.load_tokenizer(shapes_data_config)
    it = pipeline.make_train_iterator(shapes_data_config, global_batch_size=4, seed=0,
                                      source=plain, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="'snli_ve' needs records with a 'scene'"):
        next(it)
    with pytest.raises(ValueError, match="text_tasks must be one of"):
        task_fields.task_field_shapes("gqa", 24, 28)
    with pytest.raises(ValueError, match="data.text_tasks='gqa' is not valid"):
        shapes_data_config.text_tasks = "gqa"
        DataBridge(shapes_data_config)
