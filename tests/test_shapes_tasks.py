"""Task records of the shapes world: every answer, statement label and hypothesis label is
re-derived here from the scene dict (positions and attributes, not scene['relations'] or the
module's helpers), label balances, soft scores, determinism and VL-T5's task prefixes."""
import itertools
import re
from collections import Counter

import numpy as np
import pytest

from vlp_jax.data import shapes_tasks as st
from vlp_jax.data import shapes_world as sw

SCENES = [sw.sample_scene(np.random.default_rng(s)) for s in range(300)]
COUNTS = {1: "one", 2: "two", 3: "three"}
RELATION_TEXT = {"to the left of": "left of", "to the right of": "right of",
                 "above": "above", "below": "below"}
GRID = [["top left", "top", "top right"], ["left", "centre", "right"],
        ["bottom left", "bottom", "bottom right"]]


def _rng(task, s):
    return np.random.default_rng([task, s])


def _where(subject, obj):
    """Subject's place relative to obj along the axis where they are further apart."""
    dx, dy = obj["x"] - subject["x"], obj["y"] - subject["y"]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _find(scene, **attrs):
    return [i for i, o in enumerate(scene["objects"])
            if all(o[k] == v for k, v in attrs.items())]


def _article_ok(article, word):
    assert article == ("an" if word[0] in "aeiou" else "a"), (article, word)


# ----------------------------------------------------------------------------- VQA

def _vqa_truth(scene, question):
    """The answer re-derived from the scene; fails on an unknown or ambiguous question."""
    objects = scene["objects"]
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        found = _find(scene, shape=m[1])
        assert len(found) == 1, question
        return objects[found[0]]["colour"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        found = _find(scene, colour=m[1])
        assert len(found) == 1, question
        return objects[found[0]]["shape"]
    if question == "how many shapes are there?":
        return COUNTS[len(objects)]
    if m := re.fullmatch(r"is there (an?) ((?:\w+ )?\w+)\?", question):
        words = m[2].split()
        _article_ok(m[1], words[0])
        if words[-1] == "shape":
            attrs = {"colour": words[0]}
        elif len(words) == 2:
            attrs = {"colour": words[0], "shape": words[1]}
        else:
            attrs = {"shape": words[0]}
        assert set(attrs.values()) <= set(sw.COLOUR_NAMES) | set(sw.SHAPES), question
        return "yes" if _find(scene, **attrs) else "no"
    phrase = r"the (small|large) (\w+) (\w+)"
    if m := re.fullmatch(rf"where is {phrase} relative to {phrase}\?", question):
        a = _find(scene, size=m[1], colour=m[2], shape=m[3])
        b = _find(scene, size=m[4], colour=m[5], shape=m[6])
        assert len(a) == 1 and len(b) == 1 and a != b, question
        return _where(objects[a[0]], objects[b[0]]).replace(" of", "")
    raise AssertionError(f"question outside the grammar: {question!r}")


def test_vqa_answers_are_correct_unambiguous_and_in_vocabulary():
    vocab = st.answer_vocabulary()
    assert len(set(vocab)) == len(vocab)
    produced, types = Counter(), Counter()
    for s, scene in enumerate(SCENES):
        records = st.vqa_questions(scene, _rng(1, s))
        assert len(records) == 4
        assert len({r["question"] for r in records}) == 4          # distinct questions
        for r in records:
            truth = _vqa_truth(scene, r["question"])
            assert r["answer"] == truth, (scene, r)
            assert r["answers"] == [truth] * 10
            assert r["answer_type"] in st.VQA_ANSWER_TYPES
            produced[truth] += 1
            types[r["answer_type"]] += 1
    assert set(produced) == set(vocab)          # the vocabulary holds exactly what is produced
    assert all(types[t] >= 100 for t in st.VQA_ANSWER_TYPES), types


def test_vqa_answer_types_match_answers():
    vocab_of = {"colour": set(sw.COLOUR_NAMES), "shape": set(sw.SHAPES),
                "count": set(COUNTS.values()), "relation": {"left", "right", "above", "below"},
                "yes/no": {"yes", "no"}}
    for s, scene in enumerate(SCENES[:100]):
        for r in st.vqa_questions(scene, _rng(1, s), num=6):
            assert r["answer"] in vocab_of[r["answer_type"]], r


def test_vqa_yes_no_balanced():
    answers = Counter(r["answer"] for s, scene in enumerate(SCENES)
                      for r in st.vqa_questions(scene, _rng(1, s))
                      if r["answer_type"] == "yes/no")
    total = answers["yes"] + answers["no"]
    assert total >= 250, answers
    assert 0.4 <= answers["yes"] / total <= 0.6, answers


def test_vqa_num_bounds():
    scene = SCENES[0]
    assert len(st.vqa_questions(scene, _rng(0, 0), num=1)) == 1
    with pytest.raises(ValueError, match="num must be"):
        st.vqa_questions(scene, _rng(0, 0), num=0)


def test_vqa_soft_scores_follow_the_vqa_formula():
    vocab = ("red", "blue", "green", "yes")
    answers = ["red"] * 2 + ["blue"] * 5 + ["green"] * 1 + ["unseen"] * 2
    scores = st.vqa_soft_scores(answers, vocab)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    np.testing.assert_allclose(scores, [2 / 3, 1.0, 1 / 3, 0.0], rtol=1e-6)
    record = st.vqa_questions(SCENES[5], _rng(2, 5), num=1)[0]
    vocab = st.answer_vocabulary()
    scores = st.vqa_soft_scores(record["answers"], vocab)
    expected = np.zeros(len(vocab), np.float32)
    expected[vocab.index(record["answer"])] = 1.0
    np.testing.assert_array_equal(scores, expected)


# ----------------------------------------------------------------------------- NLVR2

def _nlvr2_truth(a, b, statement):
    n = r"(an?) (\w+) (\w+)"
    if m := re.fullmatch(rf"the left image contains {n} and the right image contains {n}",
                         statement):
        _article_ok(m[1], m[2])
        _article_ok(m[4], m[5])
        return bool(_find(a, colour=m[2], shape=m[3])) and bool(_find(b, colour=m[5],
                                                                       shape=m[6]))
    if m := re.fullmatch(r"both images contain (an?) (\w+)", statement):
        _article_ok(m[1], m[2])
        return bool(_find(a, shape=m[2])) and bool(_find(b, shape=m[2]))
    if m := re.fullmatch(r"exactly one image contains (an?) (\w+) shape", statement):
        _article_ok(m[1], m[2])
        return bool(_find(a, colour=m[2])) != bool(_find(b, colour=m[2]))
    if m := re.fullmatch(rf"neither image contains {n}", statement):
        _article_ok(m[1], m[2])
        return not _find(a, colour=m[2], shape=m[3]) and not _find(b, colour=m[2], shape=m[3])
    na, nb = len(a["objects"]), len(b["objects"])
    truth = {"the left image has more shapes than the right image": na > nb,
             "the left image has fewer shapes than the right image": na < nb,
             "the left image has as many shapes as the right image": na == nb}
    assert statement in truth, f"statement outside the grammar: {statement!r}"
    return truth[statement]


def test_nlvr2_labels_correct_and_balanced():
    labels, templates = Counter(), Counter()
    for s in range(len(SCENES)):
        a, b = SCENES[s], SCENES[(s * 7 + 1) % len(SCENES)]
        record = st.nlvr2_statement(a, b, _rng(3, s))
        assert isinstance(record["label"], bool)
        assert record["label"] == _nlvr2_truth(a, b, record["statement"]), record
        labels[record["label"]] += 1
        templates[record["statement"].split()[0] + " " + record["statement"].split()[-1]] += 1
    assert 0.4 <= labels[True] / len(SCENES) <= 0.6, labels
    assert len(templates) >= 5, templates       # pair, both, exactly one, neither, counts


# ----------------------------------------------------------------------------- SNLI-VE

def _caption_truth(scene, text):
    """A canonical-caption hypothesis: some distinct objects match its phrases and the first
    one stands in the stated relation to each other one."""
    parts = re.split(r" (?:and )?(to the left of|to the right of|above|below) ", text[:-1])
    phrases, rels = parts[0::2], [RELATION_TEXT[r] for r in parts[1::2]]
    attrs = []
    for phrase in phrases:
        m = re.fullmatch(r"(an?) (small|large) (\w+) (\w+)", phrase)
        assert m, f"phrase outside the grammar: {phrase!r} in {text!r}"
        _article_ok(m[1], m[2])
        attrs.append({"size": m[2], "colour": m[3], "shape": m[4]})
    objects = scene["objects"]
    for chosen in itertools.permutations(range(len(objects)), len(phrases)):
        if all(_find(scene, **at).count(i) for at, i in zip(attrs, chosen)) and all(
                _where(objects[chosen[0]], objects[j]) == r for j, r in zip(chosen[1:], rels)):
            return True
    return False


def _hypothesis_truth(scene, text):
    """True / False for a decidable hypothesis, None for one outside the decidable grammar."""
    if m := re.fullmatch(r"there is (an?) (small|large) (\w+) (\w+)\.", text):
        _article_ok(m[1], m[2])
        return bool(_find(scene, size=m[2], colour=m[3], shape=m[4]))
    if m := re.fullmatch(r"there (?:is|are) (\w+) shapes? in the picture\.", text):
        return m[1] == COUNTS[len(scene["objects"])]
    if re.match(r"an? (small|large) ", text):
        return _caption_truth(scene, text)
    return None


def test_snli_ve_labels_checked_through_the_scene_and_balanced():
    labels = Counter()
    for s, scene in enumerate(SCENES):
        record = st.snli_ve_hypothesis(scene, _rng(4, s))
        text, label = record["hypothesis"], record["label"]
        truth = _hypothesis_truth(scene, text)
        if label == "entailment":
            assert truth is True, (scene, record)
        elif label == "contradiction":
            assert truth is False, (scene, record)
        else:
            assert label == "neutral"
            assert truth is None, record
            assert not re.search(r"\b(there|left|right|above|below|one|two|three)\b", text)
        labels[label] += 1
    for label in st.SNLI_VE_LABELS:
        assert 0.25 <= labels[label] / len(SCENES) <= 0.42, labels


def test_snli_ve_caption_contradictions_are_false_for_every_swap():
    """The swap contradictions stay false whichever swap is drawn (many draws per scene)."""
    seen = 0
    for s, scene in enumerate(SCENES[:120]):
        if len(scene["objects"]) < 2:
            continue
        for k in range(8):
            record = st.snli_ve_hypothesis(scene, _rng(5, 100 * s + k))
            if record["label"] == "contradiction" and re.match(r"an? ", record["hypothesis"]):
                assert _caption_truth(scene, record["hypothesis"]) is False, (scene, record)
                seen += 1
    assert seen >= 50, seen


def _twin_scene():
    """Three red circles in a row: the case where phrases can be paired with other objects."""
    objects = [{"shape": "circle", "colour": "red", "size": size, "x": x, "y": 0.5, "r": r,
                "rgb": [225, 35, 35]} for size, x, r in
               (("large", 0.5, 0.16), ("small", 0.85, 0.09), ("small", 0.15, 0.09))]
    return {"objects": objects, "background": SCENES[0]["background"],
            "relations": sw.relations(objects)}


def test_every_swapped_caption_is_false_and_the_canonical_true():
    """What the contradiction kind 'caption' relies on, over every swap of every scene."""
    checked = 0
    for scene in SCENES + [_twin_scene()]:
        assert _caption_truth(scene, sw.canonical_caption(scene)) is True
        for kind in sw.SWAP_KINDS:
            swapped = sw.swap_attributes(scene, kind)
            if swapped is not None:
                assert _caption_truth(scene, sw.canonical_caption(swapped)) is False, (scene, kind)
                checked += 1
    assert checked >= 500, checked


# ----------------------------------------------------------------------------- grounding

def test_grounding_regions_boxes_and_phrases():
    regions = Counter()
    for s, scene in enumerate(SCENES):
        target = st.grounding_target(scene, _rng(6, s))
        obj = scene["objects"][target["index"]]
        assert target["phrase"] == f"the {obj['size']} {obj['colour']} {obj['shape']}"
        assert len(_find(scene, size=obj["size"], colour=obj["colour"],
                         shape=obj["shape"])) == 1                # the phrase names one object
        col = 0 if obj["x"] < 1 / 3 else (1 if obj["x"] < 2 / 3 else 2)
        row = 0 if obj["y"] < 1 / 3 else (1 if obj["y"] < 2 / 3 else 2)
        assert target["region"] == GRID[row][col], (obj, target)
        x0, y0, x1, y1 = target["box"]
        np.testing.assert_allclose(target["box"], [obj["x"] - obj["r"], obj["y"] - obj["r"],
                                                   obj["x"] + obj["r"], obj["y"] + obj["r"]],
                                   rtol=1e-6)
        assert 0 <= x0 < obj["x"] < x1 <= 1 and 0 <= y0 < obj["y"] < y1 <= 1
        regions[target["region"]] += 1
    assert set(regions) == {r for row in GRID for r in row}, regions


# ----------------------------------------------------------------------------- VL-T5, determinism

def test_vlt5_examples_prefixes_and_targets():
    for s, scene in enumerate(SCENES[:100]):
        examples = st.vlt5_examples(scene, _rng(7, s))
        assert [text.split(" ")[0] for text, _ in examples] == ["caption:", "vqa:", "ground:",
                                                                 "entail:"]
        (cap_in, caption), (vqa_in, answer), (ground_in, region), (ve_in, label) = examples
        assert cap_in == "caption:"
        assert all(o["colour"] in caption and o["shape"] in caption for o in scene["objects"])
        assert answer == _vqa_truth(scene, vqa_in[len("vqa: "):])
        m = re.fullmatch(r"ground: the (small|large) (\w+) (\w+)", ground_in)
        (index,) = _find(scene, size=m[1], colour=m[2], shape=m[3])
        obj = scene["objects"][index]
        assert region == GRID[min(int(obj["y"] * 3), 2)][min(int(obj["x"] * 3), 2)]
        truth = _hypothesis_truth(scene, ve_in[len("entail: "):])
        assert {"entailment": True, "contradiction": False, "neutral": None}[label] is truth


def test_same_seed_same_records():
    for s in (0, 1, 2, 150, 299):
        a, b = SCENES[s], SCENES[(s + 3) % len(SCENES)]
        runs = [(st.vqa_questions(a, _rng(8, s)), st.nlvr2_statement(a, b, _rng(8, s)),
                 st.snli_ve_hypothesis(a, _rng(8, s)), st.grounding_target(a, _rng(8, s)),
                 st.vlt5_examples(a, _rng(8, s))) for _ in range(2)]
        assert runs[0] == runs[1]
    draws = {st.vqa_questions(SCENES[10], _rng(9, k))[0]["question"] for k in range(20)}
    assert len(draws) > 1                       # the generator, not the scene alone, decides
