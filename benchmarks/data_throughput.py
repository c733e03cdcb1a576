"""Input-pipeline throughput: images/s per host for decode + augment at 224 px.

Writes `--images` synthetic photos (smooth colour fields with shapes, `--width` x `--height`
JPEG, quality 90: about the size of img2dataset's resized CC3M images) as `--shards`
webdataset tar shards in a temp dir, converts them with `vlp-jax data build --from
webdataset` to array_record, then times each pipeline producing training batches of
`--batch` examples (JPEG decode, random-resized crop to 224 x 224 bicubic, normalise,
tokenize):

  webdataset    vlp_jax.data.webdataset_source (streamed tar shards, shuffle buffer), decode
                in `read_threads` threads of this process (0 / 1 / 2): the stream is not a
                grain dataset, so it has no worker processes
  array_record  vlp_jax.data.pipeline over array_record_source.ArrayRecords (grain index
                sampler: global shuffle), with `worker_count` 0 / 1 / 2 grain worker processes
                (and 2 read threads each)
  open_clip     open_clip_train.data.get_wds_dataset (webdataset + torch DataLoader workers
                0 / 1 / 2, `image_transform(224, is_train=True)`, its tokenizer) on the same
                shards, run in benchmarks/.venv-openclip when that environment exists and has
                `webdataset` (skipped with a note otherwise)

The build itself is timed too (one line under the table). Each row: `--warmup` batches untimed (workers start, buffers fill), then batches for at least
`--seconds` s; images/s = timed images / wall time. Prints a markdown table and, where
open_clip ran, the ratio of the best vlp_jax row to open_clip's best and that of the best
vlp_jax webdataset row (the same shards read the same way).

    python benchmarks/data_throughput.py                          # 1024 images, batch 64
    python benchmarks/data_throughput.py --images 2048 --seconds 20
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OPENCLIP_PYTHON = os.path.join(HERE, ".venv-openclip", "bin", "python")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--size", type=int, default=224, help="training image side")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per row")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per row (min)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-openclip", action="store_true")
    p.add_argument("--openclip-worker", nargs=3, metavar=("PATTERN", "N", "WORKERS"),
                   help=argparse.SUPPRESS)     # internal: the open_clip side, in its venv
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

def synthetic_jpeg(rng, width: int, height: int) -> bytes:
    """A photo-like JPEG: a smooth two-colour gradient, noise and a few filled shapes."""
    import numpy as np
    from PIL import Image, ImageDraw
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = ((x / width + y / height) / 2)[..., None]
    base = a * (1 - t) + b * t + rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        w, h = rng.integers(20, 120), rng.integers(20, 120)
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shards(folder: str, images: int, shards: int, width: int, height: int) -> str:
    """<folder>/{00000..}.tar with KEY.jpg + KEY.txt members; returns the brace pattern."""
    import numpy as np
    rng = np.random.default_rng(0)
    words = ["red", "blue", "small", "large", "circle", "photo", "of", "a", "the", "on",
             "green", "field", "next", "to", "sky", "dog", "house", "tree", "near"]
    per = -(-images // shards)
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(s * per, min(images, (s + 1) * per)):
                caption = " ".join(rng.choice(words, int(rng.integers(5, 14)))) + "."
                for ext, data in (("jpg", synthetic_jpeg(rng, width, height)),
                                  ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, "{" + f"00000..{shards - 1:05d}" + "}.tar")


# ----------------------------------------------------------------------------- timing

def time_batches(iterator, batch: int, warmup: int, seconds: float) -> float:
    """images/s of `iterator` after `warmup` untimed batches, over >= `seconds` s."""
    for _ in range(warmup):
        next(iterator)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        n += batch
    return n / (time.perf_counter() - start)


def vlp_rows(args, pattern: str, built: str) -> list[tuple[str, str, float]]:
    from vlp_jax.config_schema import resolve_part
    from vlp_jax.data import array_record_source, photo, pipeline, webdataset_source
    from vlp_jax.data.tokenizer import Tokenizer
    tokenizer = Tokenizer(os.path.join(built, array_record_source.TOKENIZER_FILE))
    rows = []
    for workers in args.workers:
        c = resolve_part("data", dict(name="webdataset", image_size=args.size, text_length=32,
                                      read_threads=workers, shuffle_buffer=256))
        it = webdataset_source.make_train_iterator(
            c, global_batch_size=args.batch, seed=0,
            shards=webdataset_source.expand_shards(pattern), tokenizer=tokenizer,
            photos=photo.photo_transform(c))
        rows.append(("vlp_jax webdataset", f"{workers} read threads",
                     time_batches(it, args.batch, args.warmup, args.seconds)))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    for workers in args.workers:
        c = resolve_part("data", dict(name="array_record", path=built, image_size=args.size,
                                      text_length=32, worker_count=workers, read_threads=2))
        it = pipeline.make_train_iterator(
            c, global_batch_size=args.batch, seed=0, tokenizer=tokenizer,
            source=array_record_source.ArrayRecords(built, "train"),
            photos=photo.photo_transform(c))
        rows.append(("vlp_jax array_record", f"{workers} grain workers",
                     time_batches(it, args.batch, args.warmup, args.seconds)))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
        del it
    return rows


def openclip_worker(args) -> None:
    """Runs in .venv-openclip: one JSON line {workers: images/s}."""
    pattern, n, workers = args.openclip_worker[0], int(args.openclip_worker[1]), \
        int(args.openclip_worker[2])
    import open_clip
    from open_clip_train.data import get_wds_dataset
    preprocess = open_clip.image_transform(args.size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ns = argparse.Namespace(train_data=pattern, val_data=None, train_num_samples=n,
                            dataset_resampled=False, train_data_upsampling_factors=None,
                            seed=0, batch_size=args.batch, world_size=1, workers=workers)
    loader = get_wds_dataset(ns, preprocess, is_train=True, tokenizer=tokenizer).dataloader

    def forever():
        while True:
            yield from loader
    print(json.dumps({"workers": workers, "images_per_s": time_batches(
        forever(), args.batch, args.warmup, args.seconds)}))


def openclip_rows(args, pattern: str) -> tuple[list, str]:
    if args.no_openclip:
        return [], "open_clip: skipped (--no-openclip)"
    if not os.path.exists(OPENCLIP_PYTHON):
        return [], f"open_clip: skipped ({OPENCLIP_PYTHON} does not exist)"
    probe = subprocess.run([OPENCLIP_PYTHON, "-c", "import webdataset, open_clip, "
                            "open_clip_train.data"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return [], f"open_clip: skipped (its environment cannot import webdataset / open_clip: {last})"
    rows = []
    for workers in args.workers:
        cmd = [OPENCLIP_PYTHON, os.path.abspath(__file__), "--openclip-worker", pattern,
               str(args.images), str(workers), "--batch", str(args.batch), "--size",
               str(args.size), "--warmup", str(args.warmup), "--seconds", str(args.seconds)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            tail = (run.stderr.strip().splitlines() or ["?"])[-1]
            return rows, f"open_clip: failed at {workers} workers ({tail})"
        result = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append(("open_clip webdataset", f"{workers} DataLoader workers",
                     result["images_per_s"]))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows, ""


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.openclip_worker:
        openclip_worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="vlp_data_throughput_") as tmp:
        os.makedirs(os.path.join(tmp, "shards"))
        pattern = write_shards(os.path.join(tmp, "shards"), args.images, args.shards,
                               args.width, args.height)
        from vlp_jax.data import build
        built = os.path.join(tmp, "array_record")
        start = time.perf_counter()
        build.build("webdataset", [pattern], built, vocab_size=256, log=lambda s: None)
        build_s = time.perf_counter() - start
        jpeg_kib = sum(os.path.getsize(os.path.join(tmp, "shards", f))
                       for f in os.listdir(os.path.join(tmp, "shards"))) / 1024 / args.images
        print(f"wrote {args.images} {args.width}x{args.height} JPEGs ({jpeg_kib:.1f} KiB each) "
              f"in {args.shards} shards", file=sys.stderr, flush=True)
        rows = vlp_rows(args, pattern, built)
        extra, note = openclip_rows(args, pattern)
    rows += extra
    print(f"\nimages/s per host, decode + random-resized crop to {args.size} px + tokenize, "
          f"batch {args.batch}, {os.cpu_count()} CPUs, {args.images} JPEGs "
          f"{args.width}x{args.height}\n")
    print("| pipeline | parallelism | images/s |")
    print("|---|---|---:|")
    for name, par, rate in rows:
        print(f"| {name} | {par} | {rate:.0f} |")
    print(f"\n`vlp-jax data build --from webdataset` (decode check, write, tokenizer, sha256): "
          f"{args.images / build_s:.0f} images/s ({build_s:.1f} s)")
    if note:
        print(f"\n{note}")
    if extra:
        ours = max(r for n, _, r in rows if n.startswith("vlp_jax"))
        theirs = max(r for _, _, r in extra)
        same = max(r for n, _, r in rows if n == "vlp_jax webdataset")
        print(f"\nbest vlp_jax / best open_clip: {ours / theirs:.2f}")
        print(f"best vlp_jax webdataset / best open_clip webdataset (same shards, same "
              f"format): {same / theirs:.2f}")


if __name__ == "__main__":
    main()
