"""`vlp-jax data show DIR`: a built directory's sizes and counts, and a PNG grid of samples.

`summary(DIR)` is the text printed: the sources, per split the records, files, bytes,
captions, skipped records by kind (with the first reasons) and class count, the tokenizer and
the checksum (verified against the files with --verify). `sample_grid(DIR, n)` draws the n
records evenly spaced over the split as thumbnails (shorter side resized, centre crop; `THUMB`
px) in a grid of ceil(sqrt(n)) columns, each with its first caption (and class name) wrapped
under it, with PIL's default font.
"""
from __future__ import annotations

import math
import os
import textwrap

import numpy as np

from vlp_jax.data import array_record_source as ar
from vlp_jax.data import photo, sanitize

THUMB = 128
LINES = 3            # caption lines under a thumbnail
_LINE_HEIGHT = 12
_PAD = 6


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def summary(directory: str, verify: bool = False, reasons: int = 3) -> str:
    """The text `vlp-jax data show` prints (see the module docstring)."""
    directory = os.path.abspath(os.path.expanduser(directory))
    m = ar.read_manifest(directory)
    lines = [f"{directory}"]
    for s in m.get("sources", []):
        lines.append(f"  source: {s['format']} {' '.join(s['inputs'])}"
                     + (f" (root {s['root']})" if s.get("root") else ""))
    for name, info in m["splits"].items():
        size = sum(m["files"][f]["bytes"] for f in info["files"])
        skipped = info.get("skipped", {})
        text = (f"  {name}: {info['records']} records, {info['captions']} captions, "
                f"{len(info['files'])} file(s), {_size(size)}; skipped {sum(skipped.values())}")
        if skipped:
            text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) + ")"
        if info.get("class_names"):
            text += f"; {len(info['class_names'])} classes"
        lines.append(text)
        for r in info.get("skipped_records", [])[:reasons]:
            lines.append(f"    skipped ({r['kind']}): {r['reason']}")
    t = m["tokenizer"]
    lines.append(f"  tokenizer: {t.get('file')} ({t.get('vocab_size')} pieces; "
                 f"{t.get('origin')})")
    lines.append(f"  checksum: {m['checksum']}")
    if verify:
        bad = ar.verify(directory, m)
        lines.append("  verified: all files match" if not bad else
                     f"  verified: MISMATCH in {bad}")
    return "\n".join(lines)


def _first_split(manifest: dict) -> str:
    splits = manifest["splits"]
    return "train" if "train" in splits else next(iter(splits))


def sample_grid(directory: str, n: int = 16, split: str | None = None):
    """A PIL image: n records of `split` (default train, else the first) with captions."""
    from PIL import Image, ImageDraw
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    manifest = ar.read_manifest(directory)
    split = split or _first_split(manifest)
    source = ar.ArrayRecords(directory, split, manifest)
    picks = ar.sample_indices(len(source), n)
    cols = math.ceil(math.sqrt(len(picks)))
    rows = math.ceil(len(picks) / cols)
    cell_w, cell_h = THUMB + 2 * _PAD, THUMB + 2 * _PAD + LINES * _LINE_HEIGHT
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, THUMB // 6)
    for slot, index in enumerate(picks):
        record = source[int(index)]
        x, y = (slot % cols) * cell_w + _PAD, (slot // cols) * cell_h + _PAD
        try:
            image, _ = photo.decode_rgb(record["image"])
            thumb = photo.resize_center_crop(image, THUMB)
        except sanitize.BadExample:
            thumb = np.full((THUMB, THUMB, 3), 128, np.uint8)
        grid.paste(Image.fromarray(thumb), (x, y))
        text = record["captions"][0] if record["captions"] else ""
        if record["label"] >= 0 and source.class_names:
            text = f"[{source.class_names[record['label']]}] {text}"
        wrapped = textwrap.wrap(text, chars)[:LINES] or [""]
        for i, line in enumerate(wrapped):
            draw.text((x, y + THUMB + 2 + i * _LINE_HEIGHT), line, fill="black")
    return grid


def show(directory: str, out: str | None = "grid.png", n: int = 16, split: str | None = None,
         verify: bool = False, log=print) -> None:
    """Prints `summary` and writes the sample grid to `out` (None: no picture)."""
    log(summary(directory, verify=verify))
    if out:
        sample_grid(directory, n, split).save(out, format="PNG")
        log(f"wrote a grid of up to {n} samples to {os.path.abspath(out)}")
