"""Bad training records (undecodable image, empty caption, over-long caption, greyscale or
RGBA image, wrong size, missing fields) are skipped, converted or truncated, counted exactly,
reported in the metrics, and never crash a run or break exact resumption."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from vlp_jax.data import pipeline, sanitize, shapes_builder
from vlp_jax.data.sanitize import BadExample, clean_captions, to_rgb_image
from vlp_jax.data.tokenizer import BOS_ID, EOS_ID

LONG_CAPTION = " ".join(["a large red circle left of a small blue square"] * 30)   # 300 words


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _rng_image(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- sanitize

def test_clean_rgb_array_passes_through_unchanged():
    image = _rng_image((24, 24, 3))
    out, flags = to_rgb_image(image, 24)
    assert out is image and flags == frozenset()


@pytest.mark.parametrize("shape", [(24, 24), (24, 24, 1)])
def test_greyscale_is_replicated(shape):
    grey = _rng_image(shape)
    out, flags = to_rgb_image(grey, 24)
    assert flags == {"converted"} and out.shape == (24, 24, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey.reshape(24, 24))


def test_rgba_is_composited_over_black():
    rgba = _rng_image((24, 24, 4))
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    out, flags = to_rgb_image(rgba, 24)
    assert flags == {"converted"} and out.shape == (24, 24, 3)
    expected = np.round(rgba[:, :, :3] * (rgba[:, :, 3:] / 255.0))
    assert np.abs(out - expected).max() <= 1
    np.testing.assert_array_equal(out[0, 0], 0)                  # transparent -> black
    np.testing.assert_array_equal(out[0, 1], rgba[0, 1, :3])     # opaque -> unchanged


def test_wrong_size_is_center_cropped_and_resized():
    image = np.zeros((30, 40, 3), np.uint8)                   # H=30, W=40 (landscape)
    image[:, :5] = 255                                        # a stripe the centre crop drops
    image[:, 5:35] = 100
    out, flags = to_rgb_image(image, 24)
    assert flags == {"resized"} and out.shape == (24, 24, 3) and out.dtype == np.uint8
    assert (out == 100).all()
    same, _ = to_rgb_image(np.full((48, 48, 3), 7, np.uint8), 24)
    assert (same == 7).all()


def test_encoded_bytes_are_decoded_converted_and_resized():
    rgb = _rng_image((24, 24, 3))
    out, flags = to_rgb_image(_png(rgb), 24)
    np.testing.assert_array_equal(out, rgb)
    assert flags == frozenset()
    out, flags = to_rgb_image(_png(_rng_image((30, 40))), 24)          # greyscale PNG
    assert flags == {"converted", "resized"} and out.shape == (24, 24, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    out, flags = to_rgb_image(_png(_rng_image((24, 24, 4))), 24)       # RGBA PNG
    assert flags == {"converted"} and out.shape == (24, 24, 3)


@pytest.mark.parametrize("raw", [b"not an image", b"", _png(_rng_image((24, 24, 3)))[:60],
                                 np.zeros((24, 24, 3), np.float32), np.zeros((24, 24, 5), np.uint8),
                                 np.zeros((0, 24, 3), np.uint8), "a path?", None])
def test_undecodable_images_raise_bad_example(raw):
    with pytest.raises(BadExample, match="undecodable image") as info:
        to_rgb_image(raw, 24)
    assert info.value.kind == "skipped_undecodable"


def test_clean_captions():
    assert clean_captions([b"a red circle", "  ", "", "a blue square"]) == (
        ["a red circle", "a blue square"], 2)
    for empty in ([], ["", "   \n\t"], None):
        with pytest.raises(BadExample, match="empty caption") as info:
            clean_captions(empty)
        assert info.value.kind == "skipped_empty_caption"
    with pytest.raises(BadExample) as info:
        clean_captions([b"\xff\xfe"])
    assert info.value.kind == "skipped_malformed"


def test_long_caption_overflow_is_detected_and_truncation_keeps_eos(shapes_data_config):
    tok = shapes_builder.load_tokenizer(shapes_data_config)
    L = shapes_data_config.text_length
    assert sanitize.overflows(tok, LONG_CAPTION, L)
    assert not sanitize.overflows(tok, "a red circle", L)
    row = tok.encode([LONG_CAPTION], L)[0]
    assert row[0] == BOS_ID and row[-1] == EOS_ID and (row[1:-1] > EOS_ID).all()


# ----------------------------------------------------------------------------- pipeline

class _Source:
    """A random-access list of raw records that logs which indices the pipeline read."""

    def __init__(self, records, issues):
        self.records, self.issues, self.reads = records, issues, []

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        self.reads.append(int(index))
        return self.records[index]

    def expected_counts(self, reads) -> dict[str, int]:
        """{kind: count} of the records at `reads` (with repeats)."""
        return sanitize.issue_dict(sum((sanitize.issue_vector(self.issues[i]) for i in reads),
                                       np.zeros(sanitize.NUM_ISSUES, np.int32)))


def _bad_source(data_config, num_good=6) -> _Source:
    """`num_good` clean shapes records (labels 100 + i), then 11 injected ones, 5 of which
    must be skipped; every kept record has a unique label (its identity)."""
    real = shapes_builder.ensure_built(data_config).as_data_source("train")
    good = [dict(real[i], label=100 + i) for i in range(num_good)]
    base = good[0]
    caps = list(base["captions"])
    bad = [
        (dict(image=b"not an image at all", captions=caps, label=1), ["skipped_undecodable"]),
        (dict(image=_png(_rng_image((24, 24, 3)))[:50], captions=caps, label=2),   # truncated
         ["skipped_undecodable"]),
        (dict(image=base["image"], captions=[], label=3), ["skipped_empty_caption"]),
        (dict(image=base["image"], captions=["", "   "], label=4), ["skipped_empty_caption"]),
        (dict(image=base["image"], captions=caps, no_label=5), ["skipped_malformed"]),
        (dict(image=base["image"], captions=["", b"a red circle"], label=10),
         ["dropped_empty_caption"]),
        (dict(image=base["image"], captions=[LONG_CAPTION], label=11), ["truncated_caption"]),
        (dict(image=_rng_image((24, 24), 1), captions=caps, label=12), ["converted_channels"]),
        (dict(image=_rng_image((24, 24, 4), 2), captions=caps, label=13),
         ["converted_channels"]),
        (dict(image=_rng_image((30, 40, 3), 3), captions=caps, label=14), ["resized"]),
        (dict(image=_png(_rng_image((40, 30), 4)), captions=caps, label=15),
         ["converted_channels", "resized"]),
    ]
    return _Source(good + [r for r, _ in bad], [[]] * num_good + [k for _, k in bad])


def _unthreaded(data_config):
    """Reads records only when a batch needs them and keeps none in memory, so `_Source.reads`
    is what was consumed."""
    data_config.read_threads, data_config.prefetch_batches, data_config.cache_mb = 0, 0, 0
    return data_config


def test_each_bad_record_is_handled_and_counted_exactly(shapes_data_config):
    c = _unthreaded(shapes_data_config)
    c.augment = False
    source = _bad_source(c)
    it = pipeline.make_train_iterator(c, global_batch_size=4, seed=0, source=source)
    kept_labels = list(range(100, 106)) + list(range(10, 16))                 # 12 of 17 kept
    epochs = 2
    batches = [next(it) for _ in range(epochs * 12 // 4)]
    labels = np.concatenate([b["label"] for b in batches])
    assert sorted(labels.tolist()) == sorted(kept_labels * epochs)   # each kept record, no bad
    for b in batches:
        assert sorted(b) == ["image", "label", "text"] and b["image"].shape == (4, 24, 24, 3)
        assert np.isfinite(b["image"]).all() and -1 <= b["image"].min() <= b["image"].max() <= 1
    by_label = {}
    for b in batches:
        for image, text, label in zip(b["image"], b["text"], b["label"]):
            by_label[int(label)] = (np.round((image + 1) * 127.5).astype(np.uint8), text)
    grey, _ = by_label[12]
    np.testing.assert_array_equal(grey, np.repeat(_rng_image((24, 24), 1)[..., None], 3, 2))
    rgba = _rng_image((24, 24, 4), 2)
    assert np.abs(by_label[13][0] - rgba[..., :3] * (rgba[..., 3:] / 255.0)).max() <= 1
    _, long_text = by_label[11]
    assert long_text[0] == BOS_ID and long_text[-1] == EOS_ID and (long_text[1:-1] > EOS_ID).all()
    tok = shapes_builder.load_tokenizer(c)
    assert tok.decode(by_label[10][1]) == "a red circle"

    totals = it.issue_totals()
    assert totals == source.expected_counts(source.reads), (totals, source.reads)
    reads_per_record = np.bincount(source.reads, minlength=len(source))
    assert set(reads_per_record[:6]) == {epochs}                  # kept: read each epoch
    assert set(reads_per_record[6:]) <= {epochs, epochs - 1}      # skipped ones at the tail
    per_epoch = source.expected_counts(range(len(source)))
    assert per_epoch == dict(skipped_malformed=1, skipped_undecodable=2, skipped_empty_caption=2,
                             converted_channels=3, resized=2, truncated_caption=1,
                             dropped_empty_caption=1)
    for kind in ("converted_channels", "resized", "truncated_caption", "dropped_empty_caption"):
        assert totals[kind] == epochs * per_epoch[kind], (kind, totals)


def test_resume_across_skipped_records_is_exact(shapes_data_config):
    c = _unthreaded(shapes_data_config)
    source = _bad_source(c)
    make = lambda: pipeline.make_train_iterator(c, global_batch_size=2, seed=1,  # noqa: E731
                                                source=source)
    it = make()
    states, batches, totals, first_read = [], [], [], []
    for _ in range(14):                                       # a bit over two epochs
        states.append(json.loads(json.dumps(it.get_state())))
        n = len(source.reads)
        batches.append(next(it))
        totals.append(it.issue_totals())
        first_read.append(source.reads[n])
    assert totals[-1] == source.expected_counts(source.reads)
    skip_first = [i for i, r in enumerate(first_read) if source.issues[r][:1] and
                  source.issues[r][0].startswith("skipped")]
    assert skip_first, "no saved position was followed by a skipped record"
    for i in sorted(set(skip_first) | {0, 5, 11}):
        resumed = make()
        resumed.set_state(states[i])
        assert resumed.issue_totals() == (totals[i - 1] if i else
                                          dict.fromkeys(sanitize.ISSUE_KINDS, 0))
        for j in range(i, len(batches)):
            b = next(resumed)
            assert all(np.array_equal(b[k], batches[j][k]) for k in batches[j]), (i, j)
            assert resumed.issue_totals() == totals[j], (i, j)


def test_a_source_without_any_usable_record_raises_instead_of_hanging(shapes_data_config):
    source = [dict(image=b"junk", captions=["a red circle"], label=0), None, {},
              dict(image=np.zeros((24, 24, 3), np.uint8), captions=[" "], label=0)] * 2
    it = pipeline.make_train_iterator(shapes_data_config, global_batch_size=2, seed=0,
                                      source=source)
    with pytest.raises(RuntimeError, match="8 consecutive training records were unusable") as e:
        next(it)
    assert ("'skipped_malformed': 4, 'skipped_undecodable': 2, 'skipped_empty_caption': 2"
            in str(e.value)), str(e.value)


# ----------------------------------------------------------------------------- trainer

def test_training_on_bad_records_finishes_and_reports_counts(shapes_data_config, tmp_path,
                                                             monkeypatch):
    from tests.helpers import tiny_clip_config
    from vlp_jax.train import data_bridge
    from vlp_jax.train.metrics_log import read_metrics
    from vlp_jax.train.trainer import train_and_evaluate

    source = _bad_source(shapes_data_config, num_good=30)      # 41 records, 36 kept
    monkeypatch.setattr(data_bridge.DataBridge, "train_source", lambda self: source)
    config = tiny_clip_config(shapes_data_config, steps=12, log_every=4, batch_size=8)
    config.evals = {}
    result = train_and_evaluate(config, str(tmp_path), progress=False)
    assert result["step"] == 12

    reference = pipeline.make_train_iterator(shapes_data_config, global_batch_size=8,
                                             seed=config.seed, source=source)
    rows = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12]
    consumed = 0
    for row in rows:                      # running counts = those of the batches consumed
        for _ in range(row["step"] - consumed):
            next(reference)
        consumed = row["step"]
        assert {k: row[f"data/{k}"] for k in sanitize.ISSUE_KINDS} == reference.issue_totals()
    data = result["data"]
    assert data == reference.issue_totals()
    assert all(data[k] >= 2 for k in sanitize.ISSUE_KINDS), data      # 96 examples: > 2 epochs
    assert np.isfinite(rows[-1]["train/loss"])
