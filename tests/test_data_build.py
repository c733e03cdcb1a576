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
