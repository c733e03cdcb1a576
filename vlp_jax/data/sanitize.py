"""Turning raw training records into clean ones, or rejecting them with a reason.

Real image-text data holds records a training run must survive hours in: bytes that are not
an image, captions that are empty or far longer than the text context, greyscale or RGBA
images, images of another size. The pipeline runs every record through these pure functions:

  * `to_rgb_image(raw, size)` accepts encoded image bytes (any format PIL reads) or a uint8
    array [H, W], [H, W, 1], [H, W, 2], [H, W, 3] or [H, W, 4] and returns uint8
    [size, size, 3]:
      - greyscale (and PIL modes L, I, 1, P, CMYK, YCbCr, ...) -> RGB (grey replicated);
      - alpha ([H, W, 2] grey+alpha, [H, W, 4] RGBA, PIL LA/RGBA/PA) -> composited over black,
        rgb * alpha / 255: transparent pixels become black, like the shapes world's dark
        backgrounds;
      - H, W != size -> the largest centred square cropped (non-square images lose the ends of
        their long side, CLIP style), then resized bilinearly (PIL) to size x size.
    Conversions are reported as flags ("converted", "resized"); anything that cannot be
    decoded (not an image, truncated file, wrong dtype or rank, zero-sized) raises
    `BadExample("undecodable image: ...")`.
  * `clean_captions(captions)` decodes bytes, drops empty / whitespace-only captions and
    raises `BadExample("empty caption")` when none is left.
  * `overflows(tokenizer, text, length)`: whether a caption needs more than `length` tokens
    (the tokenizer then keeps bos, the first length - 2 pieces and eos).

`ISSUE_KINDS` names the per-example counters the pipeline emits (see `pipeline`).
"""
from __future__ import annotations

import io
from typing import Iterable, Sequence

import numpy as np

# Per-example issue counters, in the order of the `data_issues` vector.
ISSUE_KINDS = (
    "skipped_malformed",        # record lacks image / captions / label (skipped)
    "skipped_undecodable",      # image bytes or array could not be read (skipped)
    "skipped_empty_caption",    # no non-empty caption (skipped)
    "converted_channels",       # greyscale / alpha / palette image converted to RGB (kept)
    "resized",                  # image of another size cropped and resized (kept)
    "truncated_caption",        # an emitted caption was longer than text_length (kept, cut)
    "dropped_empty_caption",    # some (not all) captions were empty and were dropped (kept)
)
ISSUE_INDEX = {kind: i for i, kind in enumerate(ISSUE_KINDS)}
NUM_ISSUES = len(ISSUE_KINDS)


class BadExample(ValueError):
    """A record that cannot be trained on; `kind` is its ISSUE_KINDS counter."""

    def __init__(self, message: str, kind: str):
        if kind not in ISSUE_INDEX:
            raise ValueError(f"unknown issue kind {kind!r}; valid: {ISSUE_KINDS}")
        super().__init__(message)
        self.kind = kind


def issue_vector(kinds: Iterable[str]) -> np.ndarray:
    """int32 [NUM_ISSUES] counting each kind in `kinds` once per occurrence."""
    out = np.zeros(NUM_ISSUES, np.int32)
    for kind in kinds:
        out[ISSUE_INDEX[kind]] += 1
    return out


def issue_dict(vector) -> dict[str, int]:
    """int [NUM_ISSUES] -> {kind: count}."""
    vector = np.asarray(vector).reshape(-1)
    if vector.shape != (NUM_ISSUES,):
        raise ValueError(f"expected {NUM_ISSUES} issue counts, got shape {vector.shape}")
    return {kind: int(v) for kind, v in zip(ISSUE_KINDS, vector)}


# ----------------------------------------------------------------------------- images

_BYTES = (bytes, bytearray, memoryview, np.bytes_)


def _undecodable(why: str) -> BadExample:
    return BadExample(f"undecodable image: {why}", "skipped_undecodable")


def _decode(raw) -> tuple[np.ndarray, bool]:
    """Encoded bytes -> (uint8 [H, W, 3] or [H, W, 4], whether the stored mode was not RGB),
    or BadExample."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(bytes(raw))) as img:
            img.load()
            if img.mode in ("RGB", "RGBA"):
                return np.asarray(img, np.uint8), img.mode != "RGB"
            has_alpha = img.mode in ("LA", "PA", "La") or "transparency" in img.info
            return np.asarray(img.convert("RGBA" if has_alpha else "RGB"), np.uint8), True
    except Exception as e:   # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise _undecodable(f"{type(e).__name__}: {e}") from None


def _channels_to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W] / [H, W, 1|2|3|4] -> uint8 [H, W, 3] (see the module docstring)."""
    if image.ndim == 2:
        image = image[:, :, None]
    c = image.shape[2]
    if c == 3:
        return image
    if c in (2, 4):
        color, alpha = image[:, :, :c - 1].astype(np.uint32), image[:, :, c - 1:].astype(np.uint32)
        image = ((color * alpha + 127) // 255).astype(np.uint8)   # over black, rounded
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def _square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: centred square crop, bilinear resize."""
    from PIL import Image
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(image)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize(
        (size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.uint8)


def to_rgb_image(raw, size: int) -> tuple[np.ndarray, frozenset[str]]:
    """Encoded bytes or a uint8 array -> (uint8 [size, size, 3], flags).

    flags is a subset of {"converted", "resized"}. An already clean uint8 [size, size, 3]
    array is returned as is (no copy). Raises BadExample (kind skipped_undecodable) when the
    input is not a readable image.
    """
    flags = set()
    if isinstance(raw, _BYTES) or (isinstance(raw, np.ndarray) and raw.dtype.kind == "S"):
        data = raw.item() if isinstance(raw, np.ndarray) else raw
        if not len(data):
            raise _undecodable("empty bytes")
        image, converted = _decode(data)
        if converted:
            flags.add("converted")
    elif isinstance(raw, np.ndarray) or hasattr(raw, "__array__"):
        image = np.asarray(raw)
        if image.dtype != np.uint8:
            raise _undecodable(f"array dtype {image.dtype}, expected uint8")
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
            raise _undecodable(f"array shape {image.shape}, expected [H, W] or [H, W, 1|2|3|4]")
        if image.ndim == 2 or image.shape[2] != 3:
            flags.add("converted")
    else:
        raise _undecodable(f"got a {type(raw).__name__}, expected bytes or a uint8 array")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise _undecodable(f"zero-sized image {image.shape}")
    image = _channels_to_rgb(image)
    if image.shape[:2] != (size, size):
        flags.add("resized")
        image = _square_resize(image, size)
    return image, frozenset(flags)


# ----------------------------------------------------------------------------- captions

def clean_captions(captions) -> tuple[list[str], int]:
    """Captions (str / bytes, a list or array) -> (non-empty captions as str, number dropped).

    Raises BadExample (kind skipped_empty_caption) when no caption has a non-space character,
    and (kind skipped_malformed) when a caption is not text.
    """
    if isinstance(captions, (str, bytes)):
        captions = [captions]
    out, dropped = [], 0
    for c in list(captions if captions is not None else []):
        if isinstance(c, (bytes, np.bytes_)):
            try:
                c = bytes(c).decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadExample(f"caption is not UTF-8: {e}", "skipped_malformed") from None
        elif not isinstance(c, str):
            raise BadExample(f"caption of type {type(c).__name__}", "skipped_malformed")
        if c.strip():
            out.append(c)
        else:
            dropped += 1
    if not out:
        raise BadExample(f"empty caption ({dropped} empty, none usable)",
                         "skipped_empty_caption")
    return out, dropped


def overflows(tokenizer, text: str, length: int) -> bool:
    """True when `text` needs more than `length` ids incl. bos/eos (encode would cut it)."""
    return tokenizer.token_count(text) > length


def any_overflows(tokenizer, texts: Sequence[str], length: int) -> bool:
    """True when any text of `texts` overflows `length` (see `overflows`)."""
    return any(overflows(tokenizer, t, length) for t in texts)
