"""Downstream-task text records derived from shapes-world scenes (`vlp_jax.data.shapes_world`).

Pure numpy / Python and deterministic: every function takes a scene dict (or two) and an
`np.random.Generator`; the same scene and generator state give the same record. Every question,
statement and hypothesis is decided by the scene dict alone (objects' shape, colour, size, x, y
and the main object's relations), and no question refers to an object ambiguously.

Words: <c> is a colour of COLOUR_NAMES, <s> a shape of SHAPES, <size> 'small' / 'large',
<n> a count word (COUNT_WORDS), <a> the article 'a' / 'an' agreeing with the next word,
<phrase> an object phrase "<a> <size> <c> <s>" (`shapes_world.object_phrase`), <the phrase>
the same with the article 'the', <rel> a relation's first wording in RELATION_WORDS.

VQA (`vqa_questions`; answer_type: grammar -> answer):
    colour    "what colour is the <s>?"                  -> <c>    (only if <s> is unique)
    shape     "what shape is the <c> object?"            -> <s>    (only if <c> is unique)
    count     "how many shapes are there?"               -> <n>
    yes/no    "is there <a> <c> <s>?" | "is there <a> <c> shape?" | "is there <a> <s>?"
                                                         -> yes / no
    relation  "where is <the phrase 0> relative to <the phrase j>?"
                                           -> left / right / above / below (scene['relations'])
  (relation only for objects j whose size-colour-shape phrase is unique in the scene). Each
  question draws its answer type uniformly among the types with an unasked question left, then a
  question of that type; a yes/no question flips a fair coin for its answer and draws its form
  (colour-shape pair, colour alone, shape alone) uniformly, then asks about something present
  (yes) or absent (no), falling back to another form, and only then to the other answer, where
  every question with the drawn answer was already asked (a lone-object scene has three 'yes'
  questions). Measured: 53% yes over the test's 300 scenes x 4 questions (321 yes/no
  questions), 50.1% over 6000 scenes x 4 questions (7007 yes/no questions).
  The questions have one truthful answer, so the 10 VQA-v2 style annotator answers agree.

NLVR2-style (`nlvr2_statement`; scene_a is the left image, scene_b the right one):
    "the left image contains <a> <c> <s> and the right image contains <a> <c> <s>"
    "both images contain <a> <s>"
    "exactly one image contains <a> <c> shape"
    "neither image contains <a> <c> <s>"
    "the left image has more shapes than the right image" | "... has fewer shapes than ..." |
    "the left image has as many shapes as the right image"
  The label is a fair coin; the template is drawn uniformly among those that can be made with
  that label for the pair (the pair and count templates always can), then the wording. A false
  pair statement has exactly one clause wrong (an object absent from that image). Measured: 47%
  true over the test's 300 pairs, 50.0% over 30000.

SNLI-VE-style (`snli_ve_hypothesis`; the label is drawn uniformly among the three):
    entailment     "there is <phrase>."  (an object of the scene)
                   "there is one shape in the picture." / "there are <n> shapes in the picture."
                   the canonical caption "<phrase> <rel> <phrase>[ and <rel> <phrase>]."
    contradiction  "there is <a> <size> <c> <s>." for a size-colour-shape absent from the scene
                   a wrong count, same wording
                   the canonical caption of `swap_attributes(scene, kind)`, kind drawn among
                   SWAP_KINDS where applicable. Each is false: a multi-object scene has one
                   large object, the main one, so a colour or shape swap misnames it; a
                   reversed relation cannot be matched by pairing the phrases differently
                   (the stated relations would have to equal the true ones as a multiset);
                   after a size swap the 'large' phrase must again name object 0, so object 1
                   looks like it, and its stated relation to object 0 (object 0's true one to
                   object 1, R) would put it, or a third twin, on object 0's R side while
                   object 0 lies on object 1's R side (contradictory along R's axis)
    neutral        statements about what the picture does not show: who drew it, when it was
                   made, what an object is made of, an object's size against a real thing
                   ("the red circle is smaller than a coin.")
  The kind (presence / count / caption, caption only with two or more objects) is drawn
  uniformly for entailment and contradiction, so both labels share their grammar. Measured:
  32% / 30% / 38% entailment / neutral / contradiction over the test's 300 scenes,
  32.5% / 33.5% / 34.0% over 30000.

Grounding (`grounding_target`): an object whose phrase is unique in the scene (object 0 always
is); its region on a 3 x 3 grid of the image (x: left / centre / right thirds, y: top / middle /
bottom thirds; "top left", "top", ..., "centre", ..., "bottom right") and its box
[x - r, y - r, x + r, y + r] clipped to [0, 1].

VL-T5 (Cho et al. 2021, "Unifying Vision-and-Language Tasks via Text Generation") casts every
task as text to text with a task prefix on the input: `vlt5_examples` gives one
(input, target) pair per single-image task: ("caption:", caption), ("vqa: <question>", answer),
("ground: <the phrase>", region), ("entail: <hypothesis>", label). VL-T5's grounding target is
a region token; here it is the grid cell's name. SNLI-VE's prefix is 'entail:' (no '-': the
shapes tokenizer, trained on captions, has no piece for it and reads it as unk). NLVR2 needs an
image pair, so it is not among them: its text form is the statement and the target 'true' / 'false'.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from vlp_jax.data.shapes_world import (COLOUR_NAMES, COUNT_WORDS, SHAPES, SIZES, SWAP_KINDS,
                                       canonical_caption, describe, object_phrase,
                                       swap_attributes)

VQA_ANSWER_TYPES = ("colour", "shape", "count", "relation", "yes/no")
RELATION_ANSWERS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
NUM_VQA_ANSWERS = 10                      # annotators per question in VQA v2
SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")
REGIONS = (("top left", "top", "top right"),
           ("left", "centre", "right"),
           ("bottom left", "bottom", "bottom right"))
VLT5_PREFIXES = ("caption:", "vqa:", "ground:", "entail:")

_NEUTRAL_FIXED = ("the shapes were drawn by a child.", "the picture was taken at night.",
                  "the image was made on a sunday.", "the shapes were painted by hand.",
                  "the picture hangs in a museum.")
_REAL_THINGS = ("a coin", "a house", "a car", "a football", "an apple")
_COMPARISONS = ("bigger than", "smaller than", "the same size as")
_MATERIALS = ("wood", "paper", "metal", "glass")


def answer_vocabulary() -> tuple[str, ...]:
    """Every answer `vqa_questions` can give: colours, shapes, count words, relations, yes, no."""
    counts = tuple(COUNT_WORDS[n] for n in sorted(COUNT_WORDS))
    return (*COLOUR_NAMES, *SHAPES, *counts, *RELATION_ANSWERS.values(), "yes", "no")


def vqa_soft_scores(answers: list[str], vocab: Sequence[str]) -> np.ndarray:
    """float32 [len(vocab)]: VQA v2's soft score min(1, count(answer) / 3) per vocabulary entry.

    count is how many of the annotators' answers equal the entry (Antol et al. 2015; Goyal et al.
    2017; the training target of Teney et al. 2018). The official evaluation averages this over
    the 10 leave-one-annotator-out subsets instead (0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / 4+
    matches); answers outside vocab score nothing.
    """
    counts = Counter(answers)
    return np.array([min(1.0, counts[word] / 3.0) for word in vocab], np.float32)


# ----------------------------------------------------------------------------- helpers

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pair_phrase(colour: str, shape: str) -> str:
    """'a red circle' / 'an orange square'."""
    return f"{_article(colour)} {colour} {shape}"


def _pairs(scene: dict) -> set[tuple[str, str]]:
    """The scene's (colour, shape) pairs."""
    return {(o["colour"], o["shape"]) for o in scene["objects"]}


def _absent_pairs(scene: dict) -> list[tuple[str, str]]:
    """(colour, shape) pairs not in the scene, in a fixed order."""
    present = _pairs(scene)
    return [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present]


def _unique_phrase(objects: list[dict], i: int) -> bool:
    """True where no other object has object i's size, colour and shape."""
    key = lambda o: (o["size"], o["colour"], o["shape"])  # noqa: E731
    return sum(key(o) == key(objects[i]) for o in objects) == 1


def _choice(rng: np.random.Generator, options: Sequence):
    return options[rng.integers(len(options))]


# ----------------------------------------------------------------------------- VQA

def _vqa_pools(scene: dict) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) of each non-yes/no type that the scene decides unambiguously."""
    objects = scene["objects"]
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    pools = {
        "colour": [(f"what colour is the {o['shape']}?", o["colour"])
                   for o in objects if shapes.count(o["shape"]) == 1],
        "shape": [(f"what shape is the {o['colour']} object?", o["shape"])
                  for o in objects if colours.count(o["colour"]) == 1],
        "count": [("how many shapes are there?", COUNT_WORDS[len(objects)])],
        "relation": [],
    }
    if _unique_phrase(objects, 0):
        main = object_phrase(objects[0], article="the")
        for rel in scene["relations"]:
            j = rel["object"]
            if _unique_phrase(objects, j):
                other = object_phrase(objects[j], article="the")
                pools["relation"].append((f"where is {main} relative to {other}?",
                                          RELATION_ANSWERS[rel["relation"]]))
    return pools


def _yes_no_pools(scene: dict) -> dict[str, dict[str, list[str]]]:
    """Per form ('pair' / 'colour' / 'shape') and answer, every yes/no question of that form."""
    objects = scene["objects"]
    colours, shapes = {o["colour"] for o in objects}, {o["shape"] for o in objects}
    pairs = _pairs(scene)
    return {
        "pair": {"yes": [f"is there {_pair_phrase(c, s)}?" for c, s in sorted(pairs)],
                 "no": [f"is there {_pair_phrase(c, s)}?" for c, s in _absent_pairs(scene)]},
        "colour": {a: [f"is there {_article(c)} {c} shape?" for c in COLOUR_NAMES
                       if (c in colours) == (a == "yes")] for a in ("yes", "no")},
        "shape": {a: [f"is there {_article(s)} {s}?" for s in SHAPES
                      if (s in shapes) == (a == "yes")] for a in ("yes", "no")},
    }


def _yes_no_question(pools: dict, asked: set[str], rng: np.random.Generator) -> tuple[str, str]:
    """A fair-coin answer and a form drawn uniformly, then an unasked question with them; where
    none is left, another form with the same answer, and only then the other answer."""
    drawn = ("yes", "no")[rng.integers(2)]
    forms = list(pools)
    first = forms.pop(int(rng.integers(len(forms))))
    for answer in (drawn, {"yes": "no", "no": "yes"}[drawn]):
        for form in [first] + forms:
            options = [q for q in pools[form][answer] if q not in asked]
            if options:
                return _choice(rng, options), answer
    raise ValueError("every yes/no question about this scene was asked")


def vqa_questions(scene: dict, rng: np.random.Generator, num: int = 4) -> list[dict]:
    """`num` distinct questions about the scene (grammar and balance: module docstring).

    Returns [{"question": str, "answers": [10] str, "answer_type": str, "answer": str}].
    """
    pools = _vqa_pools(scene)
    yes_no = _yes_no_pools(scene)
    capacity = (sum(len(p) for p in pools.values())
                + sum(len(q) for form in yes_no.values() for q in form.values()))
    if not 1 <= num <= capacity:
        raise ValueError(f"num must be in [1, {capacity}] for this scene, got {num}")
    asked: set[str] = set()
    out = []
    for _ in range(num):
        unasked = {kind: [qa for qa in pool if qa[0] not in asked] for kind, pool in pools.items()}
        kinds = [kind for kind in VQA_ANSWER_TYPES[:-1] if unasked[kind]] + ["yes/no"]
        kind = _choice(rng, kinds)
        if kind == "yes/no":
            question, answer = _yes_no_question(yes_no, asked, rng)
        else:
            question, answer = _choice(rng, unasked[kind])
        asked.add(question)
        out.append({"question": question, "answers": [answer] * NUM_VQA_ANSWERS,
                    "answer_type": kind, "answer": answer})
    return out


# ----------------------------------------------------------------------------- NLVR2

def _nlvr2_options(a: dict, b: dict, label: bool) -> list[list[str]]:
    """Per template, every statement about (left a, right b) whose truth is `label`."""
    pa, pb = sorted(_pairs(a)), sorted(_pairs(b))
    shapes_a, shapes_b = {s for _, s in pa}, {s for _, s in pb}
    colours_a, colours_b = {c for c, _ in pa}, {c for c, _ in pb}
    pair = "the left image contains {} and the right image contains {}"
    if label:
        pairs = [pair.format(_pair_phrase(*x), _pair_phrase(*y)) for x in pa for y in pb]
    else:                                         # exactly one clause wrong
        pairs = ([pair.format(_pair_phrase(*x), _pair_phrase(*y))
                  for x in _absent_pairs(a) for y in pb]
                 + [pair.format(_pair_phrase(*x), _pair_phrase(*y))
                    for x in pa for y in _absent_pairs(b)])
    both = [f"both images contain {_article(s)} {s}" for s in SHAPES
            if (s in shapes_a and s in shapes_b) == label]
    exactly_one = [f"exactly one image contains {_article(c)} {c} shape" for c in COLOUR_NAMES
                   if ((c in colours_a) != (c in colours_b)) == label]
    neither = [f"neither image contains {_pair_phrase(c, s)}" for c in COLOUR_NAMES
               for s in SHAPES if ((c, s) not in pa and (c, s) not in pb) == label]
    na, nb = len(a["objects"]), len(b["objects"])
    comparisons = {"more shapes than": na > nb, "fewer shapes than": na < nb,
                   "as many shapes as": na == nb}
    count = [f"the left image has {words} the right image"
             for words, truth in comparisons.items() if truth == label]
    return [pairs, both, exactly_one, neither, count]


def nlvr2_statement(scene_a: dict, scene_b: dict, rng: np.random.Generator) -> dict:
    """{"statement": str, "label": bool} about the pair (scene_a left, scene_b right).

    The label is a fair coin, then a template that can be made with it, then a wording (module
    docstring).
    """
    label = bool(rng.integers(2))
    templates = [t for t in _nlvr2_options(scene_a, scene_b, label) if t]
    return {"statement": _choice(rng, _choice(rng, templates)), "label": label}


# ----------------------------------------------------------------------------- SNLI-VE

def _count_sentence(n: int) -> str:
    if n == 1:
        return "there is one shape in the picture."
    return f"there are {COUNT_WORDS[n]} shapes in the picture."


def _entailment(scene: dict, kind: str, rng: np.random.Generator) -> str:
    objects = scene["objects"]
    if kind == "presence":
        return f"there is {object_phrase(_choice(rng, objects))}."
    if kind == "count":
        return _count_sentence(len(objects))
    return canonical_caption(scene)


def _contradiction(scene: dict, kind: str, rng: np.random.Generator) -> str:
    objects = scene["objects"]
    if kind == "presence":
        present = {(o["size"], o["colour"], o["shape"]) for o in objects}
        absent = [(z, c, s) for z in SIZES for c in COLOUR_NAMES for s in SHAPES
                  if (z, c, s) not in present]
        size, colour, shape = _choice(rng, absent)
        return f"there is {_article(size)} {size} {colour} {shape}."
    if kind == "count":
        return _count_sentence(_choice(rng, [n for n in COUNT_WORDS if n != len(objects)]))
    swapped = [s for s in (swap_attributes(scene, k) for k in SWAP_KINDS) if s is not None]
    return canonical_caption(_choice(rng, swapped))


def _neutral(scene: dict, rng: np.random.Generator) -> str:
    obj = _choice(rng, scene["objects"])
    name = f"the {obj['colour']} {obj['shape']}"
    templates = (_choice(rng, _NEUTRAL_FIXED),
                 f"{name} is {_choice(rng, _COMPARISONS)} {_choice(rng, _REAL_THINGS)}.",
                 f"{name} is made of {_choice(rng, _MATERIALS)}.")
    return _choice(rng, templates)


def snli_ve_hypothesis(scene: dict, rng: np.random.Generator) -> dict:
    """{"hypothesis": str, "label": "entailment" | "neutral" | "contradiction"}.

    The label is drawn uniformly; entailment and contradiction then draw a kind (presence, count,
    caption; caption needs two objects) uniformly (module docstring).
    """
    label = SNLI_VE_LABELS[rng.integers(len(SNLI_VE_LABELS))]
    if label == "neutral":
        return {"hypothesis": _neutral(scene, rng), "label": label}
    kinds = ("presence", "count", "caption") if len(scene["objects"]) > 1 else ("presence", "count")
    kind = _choice(rng, kinds)
    make = _entailment if label == "entailment" else _contradiction
    return {"hypothesis": make(scene, kind, rng), "label": label}


# ----------------------------------------------------------------------------- grounding

def region_cell(x: float, y: float) -> tuple[int, int]:
    """(row, col) of the 3 x 3 grid cell of the point (x, y) in [0, 1]^2 (x to the right, y
    downwards): its name is REGIONS[row][col]."""
    col, row = (min(int(v * 3), 2) for v in (x, y))
    return row, col


def region_of(x: float, y: float) -> str:
    """The name of the 3 x 3 grid cell of the point (x, y) (`region_cell`)."""
    row, col = region_cell(x, y)
    return REGIONS[row][col]


def grounding_target(scene: dict, rng: np.random.Generator) -> dict:
    """{"phrase": "the <size> <c> <s>", "region": str, "box": [x0, y0, x1, y1], "index": int}.

    The object is drawn among those whose phrase is unique in the scene; box is its bounding
    square [x - r, y - r, x + r, y + r] clipped to [0, 1].
    """
    objects = scene["objects"]
    index = int(_choice(rng, [i for i in range(len(objects)) if _unique_phrase(objects, i)]))
    obj = objects[index]
    box = np.clip([obj["x"] - obj["r"], obj["y"] - obj["r"], obj["x"] + obj["r"],
                   obj["y"] + obj["r"]], 0.0, 1.0)
    return {"phrase": object_phrase(obj, article="the"), "region": region_of(obj["x"], obj["y"]),
            "box": [float(v) for v in box], "index": index}


# ----------------------------------------------------------------------------- VL-T5

def vlt5_example(scene: dict, task: int, rng: np.random.Generator) -> tuple[str, str]:
    """(input text with its task prefix, target text) of task VLT5_PREFIXES[task] on `scene`.

    caption: a caption drawn by `describe`; vqa: one `vqa_questions` question and its answer;
    ground: a `grounding_target` phrase and its region; entail: a hypothesis and its label.
    Only the asked task is drawn (the training pipeline makes one per example).
    """
    if not 0 <= task < len(VLT5_PREFIXES):
        raise ValueError(f"task must be in [0, {len(VLT5_PREFIXES)}), got {task}")
    if task == 0:
        text, target = "", describe(scene, rng)
    elif task == 1:
        qa = vqa_questions(scene, rng, num=1)[0]
        text, target = qa["question"], qa["answer"]
    elif task == 2:
        ground = grounding_target(scene, rng)
        text, target = ground["phrase"], ground["region"]
    else:
        ve = snli_ve_hypothesis(scene, rng)
        text, target = ve["hypothesis"], ve["label"]
    return f"{VLT5_PREFIXES[task]} {text}".rstrip(), target


def vlt5_examples(scene: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """[`vlt5_example` of each task on `scene`], in VLT5_PREFIXES order."""
    return [vlt5_example(scene, task, rng) for task in range(len(VLT5_PREFIXES))]


__all__ = ["NUM_VQA_ANSWERS", "REGIONS", "RELATION_ANSWERS", "SNLI_VE_LABELS",
           "VLT5_PREFIXES", "VQA_ANSWER_TYPES", "answer_vocabulary", "grounding_target",
           "nlvr2_statement", "region_cell", "region_of", "snli_ve_hypothesis", "vlt5_example",
           "vlt5_examples", "vqa_questions", "vqa_soft_scores"]
