"""A procedural image-text world of coloured shapes: scenes, images, captions, hard negatives.

Everything here is pure numpy and deterministic: a scene is sampled from an `np.random.Generator`,
rendered from its own description (the background texture has its own seed inside the scene),
and described by captions drawn with a second generator.

A *scene* is a JSON-able dict:

    {"objects": [{"shape": "circle", "colour": "red", "size": "large",
                  "x": 0.31, "y": 0.52, "r": 0.17, "rgb": [228, 30, 41]}, ...],   # 1-3 objects
     "background": {"kind": "flat" | "gradient" | "noise", "rgb": [..], "rgb2": [..],
                    "angle": float, "noise_seed": int},
     "relations": [{"subject": 0, "object": j, "relation": "left of"}, ...]}

x, y are the object's centre in [0, 1] (x to the right, y downwards); r its bounding radius as a
fraction of the image side. Object 0 is the *main* object: the scene's class label is
"<colour> <shape>" of object 0 (`CLASS_NAMES`). It is the unique largest object: in scenes with
several objects it is "large" and every other object is "small"; a lone object has either size.
Relations relate the main object to each other object along the axis where they are further
apart (placement keeps that axis at least 1.5x the other, so the relation is unambiguous):
"left of", "right of", "above", "below" (subject's position relative to the object's).

Captions mention every object exactly once, in scene order (main first), each as
"<article> [<size>] <colour> <shape>"; relation words are always the main object's relation to
the object that follows them. Hard negatives (`swap_attributes`, `hard_negatives`) rewrite the
canonical caption with two objects' colours, shapes or sizes exchanged, or a relation reversed.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {                       # saturated / bright: at least one channel >= 200
    "red": (225, 35, 35), "orange": (255, 140, 0), "yellow": (240, 225, 30),
    "green": (40, 200, 60), "cyan": (40, 220, 230), "blue": (45, 95, 255),
    "purple": (165, 65, 230), "white": (240, 240, 240),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUNDS = ("flat", "gradient", "noise")
SWAP_KINDS = ("colour", "shape", "size", "relation")

CLASS_NAMES = tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES)
PROMPT_TEMPLATES = (
    "a picture of a {}.",
    "an image containing a {}.",
    "a {} on a plain background.",
    "a photo of a {}.",
    "there is a {}.",
    "a drawing of a {}.",
)

_RADIUS = {"small": (0.08, 0.105), "large": (0.15, 0.19)}
_MARGIN = 0.05                   # kept free at the border (room for augmentation shifts)
_GAP = 0.02                      # minimum gap between two objects' bounding circles
_DOMINANCE = 1.5                 # relation axis distance >= 1.5 x the other axis distance
_BG_MAX = 80                     # background channels stay below this (objects are bright)

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
BACKGROUND_WORDS = {"flat": ("plain", "dark", "flat"), "gradient": ("shaded", "gradient", "dark"),
                    "noise": ("textured", "noisy", "dark")}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def class_index(colour: str, shape: str) -> int:
    """Index of "<colour> <shape>" in CLASS_NAMES; ValueError names an unknown word."""
    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r} is unknown; valid: {COLOUR_NAMES}")
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is unknown; valid: {SHAPES}")
    return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def scene_label(scene: dict) -> int:
    """Class id of the scene's main object (object 0)."""
    main = scene["objects"][0]
    return class_index(main["colour"], main["shape"])


# ----------------------------------------------------------------------------- sampling

def relation(subject: dict, obj: dict) -> str:
    """Where `subject` is relative to `obj`, along the axis where they are further apart."""
    dx, dy = obj["x"] - subject["x"], obj["y"] - subject["y"]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def relations(objects: list[dict]) -> list[dict]:
    """The main object's relation to every other object."""
    return [{"subject": 0, "object": j, "relation": relation(objects[0], objects[j])}
            for j in range(1, len(objects))]


def _placement_ok(objects: list[dict]) -> bool:
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            a, b = objects[i], objects[j]
            dx, dy = abs(a["x"] - b["x"]), abs(a["y"] - b["y"])
            if np.hypot(dx, dy) < a["r"] + b["r"] + _GAP:
                return False
            if i == 0 and max(dx, dy) < _DOMINANCE * min(dx, dy):
                return False
    return True


def _sample_objects(rng: np.random.Generator, n: int) -> list[dict] | None:
    sizes = [SIZES[rng.integers(2)]] if n == 1 else ["large"] + ["small"] * (n - 1)
    radii = [round(float(rng.uniform(*_RADIUS[size])), 4) for size in sizes]
    spans = [(r + _MARGIN, 1.0 - 2 * (r + _MARGIN)) for r in radii]       # (low, width)
    for _ in range(200):                        # rejection-sample the positions
        u = rng.random((n, 2)).tolist()
        objects = [{"size": size, "x": round(lo + w * ux, 4), "y": round(lo + w * uy, 4),
                    "r": r} for size, r, (lo, w), (ux, uy) in zip(sizes, radii, spans, u)]
        if _placement_ok(objects):
            break
    else:
        return None
    colours = rng.integers(len(COLOUR_NAMES), size=n).tolist()
    shapes = rng.integers(len(SHAPES), size=n).tolist()
    jitter = rng.integers(-12, 13, (n, 3))
    for obj, c, sh, jit in zip(objects, colours, shapes, jitter):
        name = COLOUR_NAMES[c]
        obj.update(shape=SHAPES[sh], colour=name,
                   rgb=np.clip(np.asarray(COLOURS[name]) + jit, 0, 255).tolist())
    return [{k: o[k] for k in ("shape", "colour", "size", "x", "y", "r", "rgb")}
            for o in objects]


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> dict:
    """A random scene (see the module docstring) with 1..max_objects objects."""
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be in [1, 3], got {max_objects}")
    n = int(rng.integers(1, max_objects + 1))
    objects = None
    while objects is None:                      # a crowded draw falls back to fewer objects
        objects = _sample_objects(rng, n)
        n = max(1, n - 1)
    background = {"kind": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
                  "rgb": [int(v) for v in rng.integers(0, _BG_MAX - 20, 3)],
                  "rgb2": [int(v) for v in rng.integers(0, _BG_MAX - 20, 3)],
                  "angle": round(float(rng.uniform(0, 2 * np.pi)), 4),
                  "noise_seed": int(rng.integers(2**31))}
    return {"objects": objects, "background": background, "relations": relations(objects)}


# ----------------------------------------------------------------------------- rendering

def _shape_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (negative inside) to a shape of bounding radius r."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.hypot(dx, dy) - 0.92 * r
    if shape == "square":
        return np.maximum(ax, ay) - 0.72 * r
    if shape == "diamond":
        return (ax + ay - r) / np.sqrt(2.0)
    if shape == "triangle":                     # pointing up; circumradius r, centroid at 0
        half = 0.5 * r
        slanted = np.maximum(0.866 * dx, -0.866 * dx) - 0.5 * dy - half
        return np.maximum(dy - half, slanted)
    if shape == "cross":
        arm, width = 0.9 * r, 0.3 * r
        return np.minimum(np.maximum(ax - arm, ay - width), np.maximum(ax - width, ay - arm))
    raise ValueError(f"shape {shape!r} is unknown; valid: {SHAPES}")


def _background(bg: dict, size: int) -> np.ndarray:
    """float32 [size, size, 3] in [0, 255]."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    rgb, rgb2 = np.asarray(bg["rgb"], np.float32), np.asarray(bg["rgb2"], np.float32)
    if bg["kind"] == "gradient":
        c, s = np.cos(bg["angle"]), np.sin(bg["angle"])
        w = (c * (t[None, :] - 0.5) + s * (t[:, None] - 0.5)) / np.sqrt(0.5) + 0.5   # [H, W]
        img = rgb + np.clip(w, 0, 1)[..., None] * (rgb2 - rgb)
    else:
        img = np.broadcast_to(rgb, (size, size, 3)).astype(np.float32)
    if bg["kind"] == "noise":                   # smooth blobs: a 4x4 grid, bilinear upsampled
        noise_rng = np.random.default_rng(bg["noise_seed"])
        grid = noise_rng.uniform(-20, 20, (4, 4, 3)).astype(np.float32)
        pos = np.clip(t * 3, 0, 3)
        lo = np.minimum(pos.astype(int), 2)
        m = np.zeros((size, 4), np.float32)
        m[np.arange(size), lo] = 1 - (pos - lo)
        m[np.arange(size), lo + 1] = pos - lo
        rows = (m @ grid.reshape(4, 12)).reshape(size, 4, 3)             # [H, 4, 3]
        img = img + np.matmul(m, rows)                                  # [H, W, 3]
        img = img + 8.0 * noise_rng.random((size, size, 3), dtype=np.float32) - 4.0  # grain
    return np.clip(img, 0, _BG_MAX + 20)


def _pixel_span(centre: float, r: float, size: int) -> tuple[int, int]:
    """Pixel range [lo, hi) that holds an object of bounding radius r (plus anti-aliasing)."""
    return (max(int((centre - 1.1 * r) * size) - 1, 0),
            min(int((centre + 1.1 * r) * size) + 2, size))


def render(scene: dict, image_size: int = 64) -> np.ndarray:
    """The scene as uint8 [image_size, image_size, 3], objects anti-aliased, in scene order."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    img = _background(scene["background"], image_size)
    t = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    for obj in scene["objects"]:                # evaluated on the object's bounding box only
        (x0, x1), (y0, y1) = (_pixel_span(obj[k], obj["r"], image_size) for k in ("x", "y"))
        box = np.s_[y0:y1, x0:x1]
        d = _shape_distance(obj["shape"], t[None, x0:x1] - obj["x"], t[y0:y1, None] - obj["y"],
                            obj["r"])
        alpha = np.clip(0.5 - d * image_size, 0.0, 1.0)[..., None]       # coverage per pixel
        img[box] = img[box] * (1 - alpha) + alpha * np.asarray(obj["rgb"], np.float32)
    return np.round(img).astype(np.uint8)


# ----------------------------------------------------------------------------- captions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: dict, rng: np.random.Generator | None = None, size: bool = True,
                  article: str | None = None) -> str:
    """'a large red circle'; with rng, the size word is drawn among synonyms (or dropped)."""
    words = []
    if size:
        words.append(SIZE_WORDS[obj["size"]][0 if rng is None else rng.integers(2)])
    words += [obj["colour"], obj["shape"]]
    return f"{article or _article(words[0])} {' '.join(words)}"


def _pick(rng: np.random.Generator, options) -> Any:
    return options[rng.integers(len(options))]


def describe(scene: dict, rng: np.random.Generator) -> str:
    """One truthful caption drawn among templates and wordings (objects in scene order)."""
    objects, rels = scene["objects"], scene["relations"]
    n = len(objects)
    with_size = rng.random(n) < 0.75
    phrases = [object_phrase(o, rng, bool(s)) for o, s in zip(objects, with_size)]
    rel = [_pick(rng, RELATION_WORDS[r["relation"]]) for r in rels]
    bg = _pick(rng, BACKGROUND_WORDS[scene["background"]["kind"]])
    main = phrases[0]
    if n == 1:
        single = objects[0]
        templates = [f"{main}.", f"a picture of {main}.", f"an image of {main}.",
                     f"there is {main} on a {bg} background.", f"{main} on a {bg} background.",
                     f"a single shape: {main}.",
                     f"{object_phrase(single, rng, bool(with_size[0]), 'one')}."]
        return _pick(rng, templates)
    body = f"{main} {rel[0]} {phrases[1]}"
    if n == 3:
        body += f" and {rel[1]} {phrases[2]}"
    listing = " and ".join(phrases) if n == 2 else f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    templates = [f"{body}.", f"there is {body}.", f"a picture of {body}.",
                 f"{COUNT_WORDS[n]} shapes: {body}.", f"{listing}."]
    if n == 2:                                  # (three objects: long enough already)
        templates.append(f"{body} on a {bg} background.")
    return _pick(rng, templates)


def describe_many(scene: dict, rng: np.random.Generator, num: int = 5) -> list[str]:
    """`num` captions of the scene, distinct where the scene allows (a few retries)."""
    out: list[str] = []
    for _ in range(8 * num):
        caption = describe(scene, rng)
        if caption not in out:
            out.append(caption)
        if len(out) == num:
            return out
    while len(out) < num:
        out.append(describe(scene, rng))
    return out


def canonical_caption(scene: dict) -> str:
    """The deterministic caption used for hard negatives: sizes always, first wordings."""
    objects, rels = scene["objects"], scene["relations"]
    text = object_phrase(objects[0])
    for r in rels:
        if r["object"] > 1:
            text += " and"
        text += f" {RELATION_WORDS[r['relation']][0]} {object_phrase(objects[r['object']])}"
    return text + "."


# ----------------------------------------------------------------------------- hard negatives

def _swap_partner(objects: list[dict], field: str) -> int | None:
    for j in range(1, len(objects)):
        if objects[j][field] != objects[0][field]:
            return j
    return None


def swap_attributes(scene: dict, kind: str) -> dict | None:
    """A copy of the scene changed in one compositional way, or None where impossible.

    kind: 'colour' / 'shape' / 'size' exchange that attribute between the main object and the
    first other object where it differs; 'relation' reflects object 1 through the main object
    along their relation's axis, reversing that relation only.
    """
    if kind not in SWAP_KINDS:
        raise ValueError(f"swap kind {kind!r} is unknown; valid: {SWAP_KINDS}")
    if len(scene["objects"]) < 2:
        return None
    out = copy.deepcopy(scene)
    objects = out["objects"]
    if kind == "relation":
        axis = "x" if scene["relations"][0]["relation"] in ("left of", "right of") else "y"
        objects[1][axis] = round(2 * objects[0][axis] - objects[1][axis], 4)
        out["relations"] = relations(objects)
        return out
    field = {"colour": "colour", "shape": "shape", "size": "size"}[kind]
    j = _swap_partner(objects, field)
    if j is None:
        return None
    carried = {"colour": ("colour", "rgb"), "shape": ("shape",), "size": ("size", "r")}[kind]
    for key in carried:
        objects[0][key], objects[j][key] = objects[j][key], objects[0][key]
    return out


def swapped_caption(scene: dict, kind: str) -> str | None:
    """The canonical caption of `swap_attributes(scene, kind)` (None where impossible)."""
    swapped = swap_attributes(scene, kind)
    return None if swapped is None else canonical_caption(swapped)


def hard_negatives(scene: dict) -> list[tuple[str, str]]:
    """[(negative caption, kind)] for every applicable kind; compare with canonical_caption."""
    out = []
    for kind in SWAP_KINDS:
        caption = swapped_caption(scene, kind)
        if caption is not None:
            out.append((caption, kind))
    return out


def make_example(rng: np.random.Generator, image_size: int, num_captions: int) -> dict:
    """{'image': uint8 [S, S, 3], 'captions': [num_captions] str, 'label': int, 'scene': dict}."""
    scene = sample_scene(rng)
    captions = describe_many(scene, rng, num_captions)
    return {"image": render(scene, image_size), "captions": captions,
            "label": scene_label(scene), "scene": scene}
