"""`vlp-jax data build` / `data show` (vlp_jax.data.build, .show, .array_record_source) and the
TFDS source (vlp_jax.data.tfds_source): tiny COCO / Karpathy / CSV / TSV / webdataset /
image-folder inputs written here (with bad records of each kind), converted to array_record,
read back through the trainer's DataBridge and pipeline; a tiny TFDS dataset built here."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlp_jax import cli
from vlp_jax.config_schema import resolve_part
from vlp_jax.data import array_record_source as ar
from vlp_jax.data import build, show
from vlp_jax.data.sources import SourceError
from vlp_jax.data.tokenizer import Tokenizer
from tests.test_data_sources import _scene_files, write_coco, write_image_folder
from tests.test_webdataset_source import write_shards

SIZE = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """12 good PNG scenes under images/ plus bad records: a missing file, a truncated JPEG,
    an image whose captions are all empty, an annotation naming an unknown image id."""
    root = tmp_path_factory.mktemp("build")
    items = _scene_files(str(root / "images"), 12, seed=1, image_size=SIZE)
    with open(root / "images" / "truncated.jpg", "wb") as f:
        f.write(open(root / "images" / items[0][0], "rb").read()[:40])
    Image.new("RGB", (SIZE, SIZE)).save(root / "images" / "blank.png")
    bad = [("missing.png", ["a caption"], 0), ("truncated.jpg", ["a caption"], 0),
           ("blank.png", ["  ", ""], 0)]
    path = write_coco(str(root / "train.json"), items + bad)
    doc = json.load(open(path))
    doc["annotations"].append({"id": 999, "image_id": 12345, "caption": "orphan"})
    json.dump(doc, open(path, "w"))
    return dict(root=str(root), items=items, coco=path)


def _kinds(manifest, split="train"):
    return manifest["splits"][split]["skipped"]


def test_coco_build_keeps_good_records_and_names_each_skip(world, tmp_path):
    out = str(tmp_path / "coco")
    m = build.build("coco_json", [world["coco"]], out, vocab_size=64, log=lambda s: None)
    info = m["splits"]["train"]
    assert info["records"] == 12 and info["captions"] == 36
    assert _kinds(m) == {"skipped_undecodable": 2, "skipped_malformed": 1,
                         "skipped_empty_caption": 1}
    reasons = " | ".join(r["reason"] for r in info["skipped_records"])
    for name in ("missing.png", "truncated.jpg", "blank.png", "12345"):
        assert name in reasons
    # stored bytes are the source's, captions and order kept
    records = list(ar.records(out, "train"))
    for record, (name, caps, _) in zip(records, world["items"]):
        assert record["image"] == open(os.path.join(world["root"], "images", name), "rb").read()
        assert record["captions"] == caps and record["path"].endswith(name)
    # checksum of the files, tokenizer of the requested size
    assert ar.verify(out, m) == [] and m["checksum"] == ar.files_checksum(m["files"])
    assert Tokenizer(os.path.join(out, ar.TOKENIZER_FILE)).vocab_size <= 64
    with open(os.path.join(out, "train-00000.array_record"), "r+b") as f:
        f.seek(100)
        f.write(b"\x00corrupt")
    assert ar.verify(out, m) == ["train-00000.array_record"]


def test_karpathy_build_writes_its_three_splits_and_csv_tsv_read_their_columns(world, tmp_path):
    names = [n for n, _, _ in world["items"]]
    caps = {n: c for n, c, _ in world["items"]}
    split_of = ["train"] * 6 + ["restval"] * 2 + ["val"] * 2 + ["test"] * 2
    doc = {"images": [{"filepath": "images", "filename": n, "split": s,
                       "sentences": [{"raw": c} for c in caps[n]]}
                      for n, s in zip(names, split_of)]}
    karpathy = os.path.join(world["root"], "dataset_coco.json")
    json.dump(doc, open(karpathy, "w"))
    m = build.build("karpathy", [karpathy], str(tmp_path / "k"), vocab_size=64,
                    log=lambda s: None)
    assert {s: v["records"] for s, v in m["splits"].items()} == {
        "train": 8, "validation": 2, "test": 2}
    for sep, ext in ((",", "csv"), ("\t", "tsv")):
        path = os.path.join(world["root"], f"pairs.{ext}")
        with open(path, "w", newline="") as f:
            w = csv.writer(f, delimiter=sep)
            w.writerow(["img", "text"])
            for n in names[:5]:
                for c in caps[n]:
                    w.writerow([f"images/{n}", c])
            w.writerow(["images/missing.png", "lost"])
        m = build.build(ext, [path], str(tmp_path / ext), vocab_size=64, log=lambda s: None,
                        csv_options={"csv_img_key": "img", "csv_caption_key": "text"})
        assert m["splits"]["train"]["records"] == 5 and m["splits"]["train"]["captions"] == 15
        assert _kinds(m) == {"skipped_undecodable": 1}
    with pytest.raises(SourceError, match=r"pairs\.tsv: no column"):
        build.build("tsv", [path], str(tmp_path / "nocol"), log=lambda s: None)


def test_webdataset_and_image_folder_builds(world, tmp_path):
    pattern, captions = write_shards(tmp_path / "wds", 2, 5, seed=3, image_size=SIZE)
    shard = tmp_path / "wds" / "00001.tar"                    # cut inside its last image
    raw = shard.read_bytes()
    shard.write_bytes(raw[:raw.index(b"000010004.jpg") + 512 + 50])
    m = build.build("webdataset", [pattern], str(tmp_path / "w"), vocab_size=64,
                    log=lambda s: None)
    info = m["splits"]["train"]
    assert info["records"] == 9 and _kinds(m) == {"skipped_malformed": 1}
    assert "00001.tar" in info["skipped_records"][0]["reason"]
    assert [r["captions"][0] for r in ar.records(str(tmp_path / "w"), "train")][:5] == [
        captions[f"00000{i:04d}"] for i in range(5)]

    folder = write_image_folder(str(tmp_path / "folder"), 10, seed=4, image_size=SIZE)
    m = build.build("image_folder", [folder], str(tmp_path / "f"), split="validation",
                    log=lambda s: None)
    info = m["splits"]["validation"]
    assert info["records"] == 10 and info["class_names"] == sorted(
        info["class_names"], key=lambda n: n.replace(" ", "_"))
    labels = [r["label"] for r in ar.records(str(tmp_path / "f"), "validation")]
    assert min(labels) >= 0 and len(set(labels)) == len(info["class_names"])


def test_malformed_inputs_fail_before_writing_naming_the_file(world, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = tmp_path / "never"
    with pytest.raises(SourceError, match=r"bad\.json: not a JSON annotation file"):
        build.build("coco_json", [str(bad)], str(out), log=lambda s: None)
    assert not out.exists()
    with pytest.raises(SourceError, match="not a Karpathy-split file"):
        build.build("karpathy", [world["coco"]], str(out), log=lambda s: None)
    with pytest.raises(SourceError, match="unknown"):
        build.build("parquet", [world["coco"]], str(out), log=lambda s: None)
    empty = write_coco(str(tmp_path / "empty.json"), [("missing.png", ["x"], 0)])
    with pytest.raises(SourceError, match="no usable record"):
        build.build("coco_json", [empty], str(out), log=lambda s: None)


def test_cli_build_adds_a_split_and_show_prints_counts_and_writes_a_png(world, tmp_path,
                                                                        capsys):
    out, png = str(tmp_path / "d"), str(tmp_path / "grid.png")
    cli.main(["vlp-jax", "data", "build", "--from", "coco_json", world["coco"], "--out", out,
              "--vocab-size", "64", "--records-per-shard", "5"])
    val = write_coco(os.path.join(world["root"], "val.json"), world["items"][:4])
    cli.main(["vlp-jax", "data", "build", "--from", "coco_json", val, "--out", out,
              "--split", "validation"])
    m = ar.read_manifest(out)
    assert m["splits"]["train"]["files"] == [f"train-0000{i}.array_record" for i in range(3)]
    assert m["splits"]["validation"]["records"] == 4 and len(m["sources"]) == 2
    assert m["tokenizer"]["vocab_size"] <= 64           # the first build's tokenizer is kept
    capsys.readouterr()
    cli.main(["vlp-jax", "data", "show", out, "--out", png, "--n", "5", "--verify"])
    text = capsys.readouterr().out
    assert "train: 12 records, 36 captions, 3 file(s)" in text
    assert "skipped 4 (skipped_empty_caption 1, skipped_malformed 1, skipped_undecodable 2)" \
        in text
    assert "validation: 4 records" in text and "verified: all files match" in text
    grid = Image.open(png)
    assert grid.format == "PNG" and grid.size == (3 * (show.THUMB + 12),
                                                  2 * (show.THUMB + 12 + 3 * 12))
    assert np.asarray(grid).std() > 10                      # thumbnails, not a blank page
    with pytest.raises(SystemExit) as e:
        cli.main(["vlp-jax", "data", "build", "--from", "coco_json", val, "--out", out,
                  "--split", "validation"])
    assert e.value.code == cli.USAGE_ERROR
    assert "already built" in capsys.readouterr().err


# ----------------------------------------------------------------------------- array_record source

def _array_record_config(path, **fields):
    base = dict(name="array_record", path=path, image_size=SIZE, text_length=32,
                read_threads=0)
    return resolve_part("data", dict(base, **fields))


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    """The world's COCO file built as train, its first 4 images as validation, and an image
    folder built as a zero-shot directory."""
    root = tmp_path_factory.mktemp("built")
    out = str(root / "d")
    build.build("coco_json", [world["coco"]], out, vocab_size=64, log=lambda s: None)
    val = write_coco(os.path.join(world["root"], "val4.json"), world["items"][:4])
    build.build("coco_json", [val], out, split="validation", log=lambda s: None)
    folder = write_image_folder(str(root / "folder"), 8, seed=5, image_size=SIZE)
    build.build("image_folder", [folder], str(root / "zs"), split="validation",
                log=lambda s: None)
    return dict(dir=out, zeroshot=str(root / "zs"), folder=folder)


def test_array_record_source_shuffles_globally_and_resumes_exactly(world, built):
    from vlp_jax.train.data_bridge import DataBridge
    bridge = DataBridge(_array_record_config(built["dir"]))
    with open(os.path.join(built["dir"], ar.TOKENIZER_FILE), "rb") as f:
        assert bridge.tokenizer.model_bytes == f.read()
    def owner(text):                           # the image a (possibly cut) caption is of
        return next(i for i, (_, caps, _) in enumerate(world["items"])
                    if any(c.lower().startswith(text) for c in caps))
    it = bridge.train_iterator(4, seed=3)
    epoch = [next(it) for _ in range(3)]                       # 12 records, batch 4
    seen = [owner(t) for b in epoch for t in bridge.detokenize(b["text"])]
    assert sorted(seen) == list(range(12)) and seen != list(range(12))
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(4)]
    again = bridge.train_iterator(4, seed=3)
    again.set_state(state)
    for a, b in zip(rest, [next(again) for _ in range(4)]):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert epoch[0]["image"].shape == (4, SIZE, SIZE, 3) and epoch[0]["image"].dtype == np.float32
    assert bridge.location() == built["dir"]


def test_array_record_source_evaluates_its_splits_and_a_built_zeroshot_folder(built):
    from vlp_jax.train.data_bridge import DataBridge
    bridge = DataBridge(_array_record_config(built["dir"], zeroshot_path=built["zeroshot"]))
    val = bridge.load_eval_set("validation")
    assert val.images.shape == (4, SIZE, SIZE, 3) and len(val.captions[0]) == 3
    zs = bridge.load_eval_set("zeroshot")
    folder_bridge = DataBridge(_array_record_config(built["dir"], zeroshot_path=built["folder"]))
    from_folder = folder_bridge.load_eval_set("zeroshot")
    assert list(zs.class_names) == list(from_folder.class_names) and len(zs) == 8
    np.testing.assert_array_equal(zs.labels, from_folder.labels)
    np.testing.assert_allclose(zs.images, from_folder.images)
    with pytest.raises(SourceError, match="no split 'test'"):
        bridge.load_eval_set("test")
    with pytest.raises(SourceError, match="no manifest.json"):
        DataBridge(_array_record_config(built["folder"]))


# ----------------------------------------------------------------------------- TFDS source

_TFDS_BUILD = r'''
import io, sys, numpy as np, tensorflow_datasets as tfds
from PIL import Image
class VlpTinyPairs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None
    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "kind": tfds.features.ClassLabel(names=["dark_thing", "light_thing"])}),
            disable_shuffling=True)
    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "validation": self._generate_examples(4)}
    def _generate_examples(self, n):
        for i in range(n):
            out = io.BytesIO()
            Image.fromarray(np.full((20, 30, 3), 40 + 15 * i, np.uint8)).save(out, "JPEG")
            yield i, {"image": out.getvalue(), "kind": int(i >= 6),
                      "captions": [f"a {'light' if i >= 6 else 'dark'} picture number {i}",
                                   f"picture {i}"]}
VlpTinyPairs(data_dir=sys.argv[1], file_format="array_record").download_and_prepare(
    download_config=tfds.download.DownloadConfig(try_download_gcs=False))
'''

_TFDS_READ = r'''
import json, sys
from vlp_jax.config_schema import resolve_part
from vlp_jax.train.data_bridge import DataBridge
bridge = DataBridge(resolve_part("data", json.loads(sys.argv[1])))
batch = next(bridge.train_iterator(4, seed=0))
val = bridge.load_eval_set("validation")
print(json.dumps({"shape": list(batch["image"].shape), "texts": bridge.detokenize(batch["text"]),
                  "val": len(val), "classes": list(val.class_names),
                  "tensorflow": "tensorflow" in sys.modules}))
'''


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    subprocess.run([sys.executable, "-c", _TFDS_BUILD, data_dir], check=True,
                   capture_output=True)
    return data_dir


def _tfds_config(data_dir, **fields):
    base = dict(name="tfds", tfds_name="vlp_tiny_pairs", tfds_data_dir=data_dir,
                tfds_text_key="captions", tfds_label_key="kind", image_size=SIZE,
                text_length=16, vocab_size=64, read_threads=0,
                data_dir=os.path.join(data_dir, "cache"))
    return dict(base, **fields)


def test_tfds_source_reads_a_prepared_dataset_without_tensorflow(tiny_tfds):
    out = subprocess.run([sys.executable, "-c", _TFDS_READ, json.dumps(_tfds_config(tiny_tfds))],
                         check=True, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [4, SIZE, SIZE, 3] and result["val"] == 4
    assert result["classes"] == ["dark thing", "light thing"]
    assert all("picture" in t for t in result["texts"])
    assert result["tensorflow"] is False


def test_tfds_source_records_labels_and_errors(tiny_tfds, tmp_path):
    from vlp_jax.data import tfds_source
    from vlp_jax.train.data_bridge import DataBridge
    bridge = DataBridge(resolve_part("data", _tfds_config(tiny_tfds)))
    zs = bridge.load_eval_set("zeroshot")
    np.testing.assert_array_equal(zs.labels, [0, 0, 0, 0])
    record = bridge.train_source()[7]
    assert record["label"] == 1 and record["image"][:2] == b"\xff\xd8"
    assert [c.decode() for c in record["captions"]] == ["a light picture number 7", "picture 7"]
    with pytest.raises(SourceError, match=r"not prepared in .*tfds build vlp_nothing_here"):
        DataBridge(resolve_part("data", _tfds_config(str(tmp_path),
                                                     tfds_name="vlp_nothing_here")))
    with pytest.raises(SourceError, match="no feature 'text'"):
        tfds_source.TfdsDataset(resolve_part("data", _tfds_config(tiny_tfds,
                                                                  tfds_text_key="text")))
    with pytest.raises(SourceError, match="Unknown split 'test'"):
        bridge.load_eval_set("test")



def test_clip_own_data_reads_a_built_directory(built):
    """experiments/clip_own_data.py:train=<built dir>: data.name='array_record' from the
    manifest, its validation split for retrieval, the built zero-shot directory; val= / root=
    are refused (they cannot take effect)."""
    from tests.helpers import experiment_path
    from vlp_jax.config_args import load_config
    from vlp_jax.train.data_bridge import DataBridge
    cfg = load_config(experiment_path(
        f"clip_own_data.py:smoke,train={built['dir']},zeroshot={built['zeroshot']}"))
    assert cfg.data.name == "array_record" and cfg.data.path == built["dir"]
    bridge = DataBridge(cfg.data)
    assert len(bridge.load_eval_set(cfg.evals.retrieval.split)) == 4
    assert len(bridge.load_eval_set(cfg.evals.zeroshot.split)) == 8
    with pytest.raises(ValueError, match="val= and root= do not apply"):
        load_config(experiment_path(f"clip_own_data.py:train={built['dir']},val=x.json"))
