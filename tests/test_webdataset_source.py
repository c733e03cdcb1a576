"""webdataset tar shards as a data source (vlp_jax/data/webdataset_source.py, data.name=
'webdataset'): shards of rendered shapes-world scenes written here with tarfile, as img2dataset
lays them out (KEY.png / KEY.jpg with KEY.txt or KEY.json)."""
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlp_jax.config_schema import resolve_part
from vlp_jax.data import shapes_world as w
from vlp_jax.data import webdataset_source as wds
from vlp_jax.data.sources import SourceError
from vlp_jax.train.data_bridge import DataBridge

SIZE = 24


def _image_bytes(scene, fmt: str, image_size: int = 32) -> bytes:
    out = io.BytesIO()
    Image.fromarray(w.render(scene, image_size)).save(out, format=fmt)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, num_shards: int, per_shard: int, seed: int, image_size: int = 32):
    """<folder>/{00000..}.tar, per_shard scenes each: PNG in even shards, JPEG in odd ones;
    the caption as KEY.txt for even samples, as KEY.json's "caption" for odd ones. Returns
    (brace pattern, {KEY: caption})."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = {}
    for s in range(num_shards):
        fmt, ext = ("PNG", "png") if s % 2 == 0 else ("JPEG", "jpg")
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                scene = w.sample_scene(rng)
                key = f"{s:05d}{i:04d}"
                captions[key] = w.describe(scene, rng)
                _add(tar, f"{key}.{ext}", _image_bytes(scene, fmt, image_size))
                if i % 2 == 0:
                    _add(tar, f"{key}.txt", captions[key].encode())
                else:
                    _add(tar, f"{key}.json", json.dumps({"caption": captions[key],
                                                         "key": key}).encode())
    return os.path.join(str(folder), "{" + f"{0:05d}..{num_shards - 1:05d}" + "}.tar"), captions


def wds_config(**fields):
    base = dict(name="webdataset", image_size=SIZE, text_length=32, vocab_size=128,
                read_threads=0)
    return resolve_part("data", dict(base, **fields))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 training shards of 20 samples and 1 validation shard of 12, plus a cache dir."""
    root = tmp_path_factory.mktemp("wds")
    train, captions = write_shards(root / "train", 3, 20, seed=1)
    val, val_captions = write_shards(root / "val", 1, 12, seed=2)
    return dict(train=train, captions=captions, val=val, val_captions=val_captions,
                cache=str(root / "cache"))


def _keys(records):
    return [r["path"].rpartition(":")[2] for r in records]


# ----------------------------------------------------------------------------- shard lists

def test_brace_patterns_lists_and_single_paths_expand_to_existing_shards(shards):
    folder = os.path.dirname(shards["train"])
    names = [os.path.join(folder, f"{i:05d}.tar") for i in range(3)]
    assert wds.expand_shards(shards["train"]) == names
    assert wds.expand_shards(f"{names[2]},{names[0]}") == [names[2], names[0]]
    assert wds.expand_shards(names[1]) == [names[1]]
    assert wds.expand_braces("/d/{00008..00011}.tar") == [
        "/d/00008.tar", "/d/00009.tar", "/d/00010.tar", "/d/00011.tar"]
    assert wds.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    with pytest.raises(SourceError, match=r"nowhere/\{0..3\}.tar: matches no shard files"):
        wds.expand_shards(os.path.join(folder, "nowhere/{0..3}.tar"))
    with pytest.raises(SourceError, match="1 of 4 shards are missing"):
        wds.expand_shards(os.path.join(folder, "{00000..00003}.tar"))
    with pytest.raises(SourceError, match="matches no shard files"):
        DataBridge(wds_config(train_path=os.path.join(folder, "x{0..1}.tar"),
                              data_dir=shards["cache"]))


def test_the_record_memo_is_an_error_on_streams(shards):
    """data.cache_mb memoises random-access records; a stream has none to memoise."""
    with pytest.raises(ValueError, match="data.cache_mb cannot take effect"):
        DataBridge(wds_config(train_path=shards["train"], data_dir=shards["cache"], cache_mb=64))


def test_each_process_reads_shards_p_p_plus_P_and_every_sample_once_per_epoch(shards):
    paths = wds.expand_shards(shards["train"])
    assert wds.process_shards(paths, 0, 2) == [0, 2]
    assert wds.process_shards(paths, 1, 2) == [1]
    with pytest.raises(ValueError, match="process 3 of 4 gets no webdataset shard"):
        wds.process_shards(paths, 3, 4)
    stream = wds._ShardStream(paths, wds.process_shards(paths, 1, 2), seed=0, buffer_size=7)
    epoch = _keys(next(stream) for _ in range(20))
    assert sorted(epoch) == [f"00001{i:04d}" for i in range(20)]
    stream = wds._ShardStream(paths, [0, 1, 2], seed=0, buffer_size=7)
    first, second = (_keys(next(stream) for _ in range(60)) for _ in range(2))
    assert sorted(first) == sorted(second) == sorted(shards["captions"])
    assert first != second                                  # reshuffled each epoch
    assert first[:20] != sorted(first[:20])                 # the buffer mixes samples


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("taken, threads", [(3, 0), (7, 2)])
def test_a_resumed_iterator_yields_the_same_batches_bit_for_bit(shards, taken, threads):
    """60 samples an epoch, batch 8, buffer 16: after 3 batches the position is mid-shard
    with a full buffer; after 7 it is in the epoch's final drain; the next 6 batches cross
    into the next epoch."""
    bridge = DataBridge(wds_config(train_path=shards["train"], shuffle_buffer=16,
                                   read_threads=threads, data_dir=shards["cache"]))
    it = bridge.train_iterator(global_batch_size=8, seed=3)
    for _ in range(taken):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert len(state["grain"]["buffer"]) == (16 if taken == 3 else 4)
    assert state["grain"]["shard"] == (1 if taken == 3 else 3)   # 3: all read, draining
    expected = [next(it) for _ in range(6)]
    resumed = bridge.train_iterator(global_batch_size=8, seed=3)
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(6)]):
        assert sorted(got) == ["image", "label", "text"]
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["text"], want["text"])
    assert want["image"].shape == (8, SIZE, SIZE, 3) and want["image"].dtype == np.float32
    assert want["text"].shape == (8, 32) and want["text"].dtype == np.int32
    assert (want["label"] == -1).all()
    texts = bridge.detokenize(np.concatenate([b["text"] for b in expected]))
    captions = list(shards["captions"].values())
    assert all(any(c.startswith(t) for c in captions) for t in texts)   # long ones truncated
    if threads:                          # decoding in threads changes nothing
        serial = DataBridge(wds_config(train_path=shards["train"], shuffle_buffer=16,
                                       read_threads=0, data_dir=shards["cache"]))
        it0 = serial.train_iterator(global_batch_size=8, seed=3)
        for _ in range(taken):
            next(it0)
        np.testing.assert_array_equal(next(it0)["image"], expected[0]["image"])
    other = bridge.train_iterator(global_batch_size=8, seed=4)
    with pytest.raises(ValueError, match="another data stream"):
        other.set_state(state)


# ----------------------------------------------------------------------------- bad input

def _bad_shards(folder):
    """Shard 0: 12 good samples, then one without image, one without caption, one with a
    non-UTF-8 txt, one whose image does not decode; shard 1: 10 good samples, then cut off in
    the middle of the 11th's image. 21 usable samples an epoch."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(5)
    with tarfile.open(os.path.join(folder, "00000.tar"), "w") as tar:
        for i in range(12):
            scene = w.sample_scene(rng)
            _add(tar, f"good{i:02d}.png", _image_bytes(scene, "PNG"))
            _add(tar, f"good{i:02d}.txt", w.describe(scene, rng).encode())
        png = _image_bytes(w.sample_scene(rng), "PNG")
        _add(tar, "noimage.txt", b"a red circle.")
        _add(tar, "nocaption.png", png)
        _add(tar, "nocaption.json", b'{"url": "http://x"}')
        _add(tar, "latin1.png", png)
        _add(tar, "latin1.txt", "un caf\xe9 rouge.".encode("latin-1"))
        _add(tar, "garbage.jpg", b"this is not an image")
        _add(tar, "garbage.txt", b"a dog.")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(11):
            scene = w.sample_scene(rng)
            _add(tar, f"tail{i:02d}.txt", w.describe(scene, rng).encode())
            _add(tar, f"tail{i:02d}.png", _image_bytes(scene, "PNG"))
    raw = buf.getvalue()
    cut = raw.index(b"tail10.png") + 512 + 100             # inside the 11th's image data
    with open(os.path.join(folder, "00001.tar"), "wb") as f:
        f.write(raw[:cut])
    return os.path.join(folder, "{00000..00001}.tar")


def test_every_bad_sample_kind_is_counted_skipped_and_named(shards, tmp_path, caplog,
                                                           monkeypatch):
    from vlp_jax.data import pipeline
    monkeypatch.setattr(pipeline, "_skip_logs", [0])
    pattern = _bad_shards(str(tmp_path / "bad"))
    paths = wds.expand_shards(pattern)
    stream = wds._ShardStream(paths, [0, 1], seed=0, buffer_size=5)
    epoch = [next(stream) for _ in range(12 + 4 + 10 + 1)]
    kinds = {_keys([r])[0]: r.get("issue_kind") for r in epoch}
    assert kinds == {**{f"good{i:02d}": None for i in range(12)},
                     **{f"tail{i:02d}": None for i in range(10)},
                     "noimage": "skipped_malformed", "nocaption": "skipped_empty_caption",
                     "latin1": "skipped_malformed", "garbage": None,
                     "tail10": "skipped_malformed"}
    bridge = DataBridge(wds_config(train_path=pattern, shuffle_buffer=5,
                                   data_dir=shards["cache"]))
    it = bridge.train_iterator(global_batch_size=7, seed=0)
    with caplog.at_level(logging.WARNING):
        batches = [next(it) for _ in range(6)]               # two epochs of usable samples
    assert all(b["image"].shape == (7, SIZE, SIZE, 3) for b in batches)
    totals = it.issue_totals()
    for kind, per_epoch in [("skipped_malformed", 3), ("skipped_empty_caption", 1),
                            ("skipped_undecodable", 1)]:
        assert per_epoch <= totals[kind] <= 2 * per_epoch, totals
    logged = caplog.text
    assert f"{paths[0]}:noimage: no image member" in logged
    assert f"{paths[0]}:nocaption: empty caption" in logged
    assert f"{paths[0]}:latin1: caption .txt is not UTF-8" in logged
    assert f"{paths[0]}:garbage: undecodable image" in logged
    assert f"{paths[1]}:tail10: truncated or unreadable tar" in logged
    for taken in (1, 2):                 # resuming past skipped samples and the cut-off shard
        it = bridge.train_iterator(global_batch_size=7, seed=0)
        for _ in range(taken):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = bridge.train_iterator(global_batch_size=7, seed=0)
        resumed.set_state(state)
        for want, got in zip(batches[taken:], [next(resumed) for _ in range(6 - taken)]):
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["text"], want["text"])
        assert resumed.issue_totals() == totals


# ----------------------------------------------------------------------------- tokenizer

def test_the_tokenizer_sample_is_the_first_captions_and_is_cached(shards, tmp_path,
                                                                  monkeypatch):
    paths = wds.expand_shards(shards["train"])
    first = list(shards["captions"].values())[:25]            # shard then tar order
    assert wds.caption_sample(paths, 25) == first
    cache = str(tmp_path / "cache")
    assert wds.cached_caption_sample(paths, 25, cache) == first
    config = wds_config(train_path=shards["train"], tokenizer_sample=25, data_dir=str(tmp_path))
    model = DataBridge(config).tokenizer.model_bytes
    default_sample = DataBridge(wds_config(train_path=shards["train"],
                                           data_dir=shards["cache"])).tokenizer.model_bytes
    assert model != default_sample
    monkeypatch.setattr(wds, "caption_sample", lambda *a: pytest.fail("read the shards again"))
    assert wds.cached_caption_sample(paths, 25, cache) == first
    assert DataBridge(config).tokenizer.model_bytes == model


# ----------------------------------------------------------------------------- eval, experiment

def test_eval_sets_are_read_fully_in_order_and_capped(shards):
    bridge = DataBridge(wds_config(train_path=shards["train"], val_path=shards["val"],
                                   data_dir=shards["cache"]))
    val = bridge.load_eval_set("validation")
    assert val.images.shape == (12, SIZE, SIZE, 3) and val.images.dtype == np.float32
    assert val.captions == [[c] for c in shards["val_captions"].values()]
    assert (val.labels == -1).all() and -1.0 <= val.images.min() <= val.images.max() <= 1.0
    assert len(bridge.load_eval_set("validation", 5)) == 5
    assert len(bridge.load_eval_set("train", 25)) == 25
    with pytest.raises(SourceError, match="needs data.test_path"):
        bridge.load_eval_set("test")


def test_clip_own_data_trains_from_shards_and_writes_eval_json(tmp_path):
    """experiments/clip_own_data.py on a brace pattern of 4 shards x 64 scenes (24 px), one
    validation shard of 64: a width-32, one-layer CLIP, 100 steps at batch 32 on one device,
    retrieval above chance on the held-out shard."""
    from tests.helpers import experiment_path, on_devices, shrink_towers
    from vlp_jax.config_args import load_config
    from vlp_jax.train.trainer import train_and_evaluate
    train, _ = write_shards(tmp_path / "train", 4, 64, seed=10, image_size=SIZE)
    val, _ = write_shards(tmp_path / "val", 1, 64, seed=11, image_size=SIZE)
    steps = 100
    config = on_devices(load_config(experiment_path(
        f"clip_own_data.py:train={train},val={val},res={SIZE},steps={steps},batch=32,smoke")), 1)
    assert config.data.name == "webdataset" and config.data.train_path == train
    single = load_config(experiment_path(f"clip_own_data.py:train={tmp_path}/train/00000.tar"))
    assert single.data.name == "webdataset"
    config.data.update(data_dir=str(tmp_path / "cache"), vocab_size=128, shuffle_buffer=64)
    shrink_towers(config, config.data)
    config.optim.update(lr=3e-3, warmup_steps=10)
    config.train.update(log_every=50, checkpoint_every=steps)
    result = train_and_evaluate(config, str(tmp_path / "workdir"), progress=False)
    ev = json.loads((tmp_path / "workdir" / "eval.json").read_text())
    for key in ("retrieval/i2t_r1", "retrieval/t2i_r1", "retrieval/t2i_r10"):
        assert key in ev and np.isfinite(ev[key]), sorted(ev)
    assert ev["step"] == steps, ev
    assert ev["retrieval/t2i_r10"] > 2 * 10 / 64 * 100, ev   # chance 15.6%; measured 54.7%
    assert not any(v for k, v in result["data"].items() if k.startswith("skipped")), \
        result["data"]
    print({k: round(v, 2) for k, v in ev.items()})
