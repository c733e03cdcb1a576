"""CLIP (Radford et al. 2021) on your own image-text files: clip_shapes.py's towers, optimiser
and loop, with the data read from disk (`vlp_jax.data.sources`).

    vlp-jax train --workdir workdirs/coco \
      --config experiments/clip_own_data.py:train=/data/coco/dataset_coco.json,root=/data/coco

Arguments (`:a=1,b=2`):
  train=PATH     a directory written by `vlp-jax data build` (its manifest.json: train,
                 validation and zero-shot splits and tokenizer from there; val= and root= do
                 not apply), or training annotations: COCO captions / Karpathy JSON (.json), CSV / TSV
                 (.csv, .tsv: columns filepath / title, `--config.data.csv_img_key=...`), or an
                 image folder (a directory), or webdataset tar shards (.tar, or a brace
                 pattern /data/cc3m/{00000..00331}.tar as img2dataset writes them; their
                 .txt / .json captions; a stream with data.shuffle_buffer, default 1000)
  val=PATH       retrieval evaluation file, same format (default: the train file's 'val' split,
                 Karpathy layout)
  format=NAME    array_record, coco_json, csv, image_folder or webdataset instead of guessing from train's extension
  root=DIR       folder the image paths are relative to (default: each annotation file's)
  zeroshot=DIR   an image folder (one sub-folder per class) for zero-shot classification
  res, steps, batch, smoke   as clip_shapes.py (res default 64; smoke: 32 px, 300 steps)
Evaluations: `retrieval` on the validation split and, with zeroshot=, `zeroshot` on the
folder, so eval.json holds retrieval/i2t_r1 ... and zeroshot/top1 as the main job's.
"""
import os

from vlp_jax.config_args import sibling

common = sibling(__file__)
FORMATS = {".json": "coco_json", ".csv": "csv", ".tsv": "csv", ".tar": "webdataset"}


def guess_format(path: str) -> str:
    """The source name of a training path: a directory is an image folder, else by extension
    (.json -> coco_json, .csv / .tsv -> csv, .tar -> webdataset); a directory with a
    manifest.json (`vlp-jax data build`) is array_record; a brace pattern
    ({00000..00099}) is webdataset shards; no path -> coco_json."""
    if not path:
        return "coco_json"
    if "{" in path:
        return "webdataset"
    if os.path.isdir(path):
        built = os.path.exists(os.path.join(path, "manifest.json"))
        return "array_record" if built else "image_folder"
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"cannot tell the format of {path!r} from its extension; valid: "
                         f"{sorted(FORMATS)} or a directory; or pass format=")
    return FORMATS[ext]


def get_config(arg=None):
    arg = common.parse(arg, train="", val="", format="", root="", zeroshot="")
    config = common.load("clip_shapes.py", arg)   # the main job's towers, method, optimiser
    name = arg.format or guess_format(arg.train)
    data = dict(name=name, text_length=32, vocab_size=256 if arg.smoke else 2048)
    if name == "array_record":         # the built directory holds every split + tokenizer
        if arg.val or arg.root:
            raise ValueError("val= and root= do not apply to a `vlp-jax data build` directory "
                             "(its validation split and stored images are used)")
        paths = dict(path=arg.train, zeroshot_path=arg.zeroshot)
    else:
        paths = dict(train_path=arg.train, val_path=arg.val, image_root=arg.root,
                     zeroshot_path=arg.zeroshot)
    data.update({k: os.path.abspath(os.path.expanduser(v)) for k, v in paths.items() if v})
    config.data.update(data)          # in place: the text tower's context length follows it
    evals = dict(retrieval=common.evaluator("retrieval", split="validation"))
    if arg.zeroshot:
        evals["zeroshot"] = common.evaluator("zero_shot", split="zeroshot")
    config.evals = common.evals(**evals)
    return config
