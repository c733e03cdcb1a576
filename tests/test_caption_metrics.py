"""Caption metrics: BLEU / CIDEr-D pinned to pycocoevalcap 1.2, Papineni et al.'s worked
example, and the shapes world's attribute accuracy on true, foreign and corrupted captions."""
import copy
import math

import numpy as np
import pytest

from vlp_jax.data import shapes_world
from vlp_jax.evaluators.caption_metrics import (CHANCE_MAIN_OBJECT, attribute_accuracy, bleu,
                                                caption_scores, cider_d, normalize_caption,
                                                parse_caption)

_PAPINENI_REFS = [
    "It is a guide to action that ensures that the military will forever heed Party commands.",
    "It is the guiding principle which guarantees the military forces always being under the "
    "command of the Party.",
    "It is the practical guide for the army always to heed the directions of the party.",
]
_PAPINENI_1 = ("It is a guide to action which ensures that the military always obeys the "
               "commands of the party.")
_PAPINENI_2 = "It is to insure the troops forever hearing the activity guidebook that party direct."

REFERENCE_SETS = {
    "perfect": (
        ["a large red circle to the left of a small blue square.", "a small green triangle.",
         "a big yellow cross above a little white diamond."],
        [["a large red circle to the left of a small blue square.",
          "a red circle left of a blue square."],
         ["a small green triangle.", "one green triangle on a dark background.",
          "an image of a little green triangle."],
         ["there is a yellow cross over a white diamond.",
          "a big yellow cross above a little white diamond."]]),
    "wrong": (
        ["dogs sleep beside sofas", "men playing football outside"],
        [["a large red circle to the left of a small blue square.",
          "a red circle left of a blue square."],
         ["one green triangle on a dark background.", "a small green triangle."]]),
    "short": (
        ["a red circle.", "blue square", "triangle"],
        [["a large red circle to the left of a small blue square.",
          "there is a big red circle on the left of a little blue square."],
         ["a small blue square on a plain background.", "an image of a blue square."],
         ["a picture of a large green triangle.", "a green triangle."]]),
    "repeated": (
        ["the the the the the the the", "red red red red circle circle",
         "a circle a circle a circle"],
        [["the cat is on the mat", "there is a cat on the mat"],
         ["a red circle.", "a large red circle on a plain background."],
         ["a circle above a circle.", "two shapes: a white circle and a red circle."]]),
    "papineni": ([_PAPINENI_1, _PAPINENI_2], [_PAPINENI_REFS, _PAPINENI_REFS]),
    "shapes_world_5refs": (      # describe_many(sample_scene(default_rng(s)), default_rng(100 + s))
        ["a large cyan triangle to the right of a small purple cross.",             # canonical
         "a red square, a small green diamond and a small red triangle.",           # a listing
         "there is a blue cross beneath a small white cross.",                      # wrong colour
         "a purple diamond above a small orange square and above a small blue square.",  # relation
         "an image of a small green circle.",                                       # = a reference
         "a a yellow yellow diamond diamond the"],                                  # garbage
        [["two shapes: a cyan triangle on the right of a small purple cross.",
          "a picture of a big cyan triangle on the right of a purple cross.",
          "a cyan triangle and a little purple cross.",
          "a big cyan triangle on the right of a little purple cross on a gradient background.",
          "two shapes: a large cyan triangle right of a small purple cross."],
         ["a big red square on the left of a little green diamond and above a little red triangle.",
          "a picture of a large red square left of a small green diamond and over a small red "
          "triangle.",
          "a red square, a little green diamond and a small red triangle.",
          "three shapes: a large red square left of a little green diamond and above a small red "
          "triangle.",
          "there is a large red square left of a little green diamond and over a small red "
          "triangle."],
         ["a picture of a cyan cross below a small white cross.",
          "there is a cyan cross below a small white cross.",
          "there is a big cyan cross below a little white cross.",
          "a big cyan cross and a little white cross.",
          "a picture of a big cyan cross below a little white cross."],
         ["there is a big purple diamond under an orange square and above a little blue square.",
          "three shapes: a purple diamond under a small orange square and over a small blue "
          "square.",
          "there is a large purple diamond under a little orange square and above a little blue "
          "square.",
          "a picture of a purple diamond beneath a little orange square and over a small blue "
          "square.",
          "there is a large purple diamond under a little orange square and over a small blue "
          "square."],
         ["there is a little green circle on a plain background.", "a little green circle.",
          "one green circle.", "an image of a small green circle.",
          "an image of a little green circle."],
         ["there is a big yellow diamond on a textured background.",
          "a big yellow diamond on a noisy background.", "one large yellow diamond.",
          "a large yellow diamond.", "an image of a big yellow diamond."]]),
    "single_example": (["a large red circle."],
                       [["a big red circle.", "a large red circle on a dark background."]]),
}
REFERENCE_SETS["mixed"] = (
    sum((REFERENCE_SETS[k][0] for k in ("perfect", "wrong", "short", "repeated")), []) + ["..."],
    sum((REFERENCE_SETS[k][1] for k in ("perfect", "wrong", "short", "repeated")), [])
    + [["a small purple cross.", "one purple cross."]])

# Produced by pycocoevalcap 1.2's Bleu(4) (option 'closest') and Cider() (n=4, sigma=6) scorers
# on exactly the sets above, each caption lower-cased, stripped of its . , : and re-joined by
# single spaces, in their {id: [caption]} format: set -> ([BLEU-1..4], CIDEr, [CIDEr per example]).
PYCOCOEVALCAP = {
    "perfect": (
        [0.99999999992, 0.999999999917, 0.999999999914, 0.99999999991],
        5.70257049541,
        [6.33406487705, 4.6798682164, 6.09377839279]),
    "wrong": (
        [7.58163324451e-17, 8.75451598905e-17, 1.05136217756e-16, 1.37015579789e-16],
        0.0,
        [0.0, 0.0]),
    "short": (
        [0.0820849985965, 0.0670221206939, 7.17078511979e-07, 4.17100759104e-07],
        0.906499149087,
        [0.518782623899, 0.936482310446, 1.26423251292]),
    "repeated": (
        [0.399465044175, 0.266569970974, 1.73090738514e-06, 4.70967536036e-09],
        0.735061207617,
        [0.342491126783, 0.565393304858, 1.29729919121]),
    "papineni": (
        [0.733916455277, 0.502790803271, 0.390112995657, 0.30435372611],
        0.0,
        [0.0, 0.0]),
    "shapes_world_5refs": (
        [0.858937374858, 0.799127755323, 0.734177326449, 0.661592925027],
        3.39479443263,
        [4.03964587233, 3.71511883991, 2.54662264722, 3.96960017685, 4.67742649511,
         1.42035256433]),
    "single_example": (
        [0.9999999995, 0.999999999458, 0.999999999389, 0.999999999229],
        0.0,
        [0.0]),
    "mixed": (
        [0.452289377366, 0.418052701511, 0.392281571639, 0.390286798416],
        1.84705114884,
        [6.26964574506, 4.44910052096, 6.24007721464, 0.0, 0.0, 0.306477624049, 1.48896506434,
         1.14926415575, 0.221291636991, 0.628633374605, 1.41115844968, 0.0]),
}


# ----------------------------------------------------------------------------- tokenisation

def test_normalize_caption_lowercases_drops_punctuation_splits_clitics():
    # the first four expected lists are what pycocoevalcap's PTBTokenizer (corenlp 3.4.1)
    # gave for these sentences
    assert normalize_caption("Two shapes: a BIG red circle, left of a cross.") == [
        "two", "shapes", "a", "big", "red", "circle", "left", "of", "a", "cross"]
    assert normalize_caption("Don't see the man's t-shirt -- 3.5 ... !") == [
        "do", "n't", "see", "the", "man", "'s", "t-shirt", "3.5"]
    assert normalize_caption("The U.S. flag & 1,000 o'clock signs cost $5.") == [
        "the", "u.s.", "flag", "&", "1,000", "o'clock", "signs", "cost", "$", "5"]
    assert normalize_caption(" ... ") == []
    # a deliberate difference: brackets go (the toolkit keeps PTB's "-lrb-" and "-rrb-")
    assert normalize_caption("a (red) circle") == ["a", "red", "circle"]


# ----------------------------------------------------------------------------- BLEU / CIDEr-D

@pytest.mark.parametrize("name", sorted(REFERENCE_SETS))
def test_bleu_matches_pycocoevalcap(name):
    candidates, references = REFERENCE_SETS[name]
    got = bleu(candidates, references)
    assert list(got) == ["bleu1", "bleu2", "bleu3", "bleu4"]
    # relative 1e-6 (tighter than 1e-6 absolute): also pins the toolkit's 1e-15 / 1e-9 terms
    np.testing.assert_allclose(list(got.values()), PYCOCOEVALCAP[name][0], rtol=1e-6,
                               atol=1e-12)


@pytest.mark.parametrize("name", sorted(REFERENCE_SETS))
def test_cider_d_matches_pycocoevalcap(name):
    candidates, references = REFERENCE_SETS[name]
    score, per_example = cider_d(candidates, references)
    _, want, want_per_example = PYCOCOEVALCAP[name]
    assert per_example.shape == (len(candidates),)
    np.testing.assert_allclose(score, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(per_example, want_per_example, rtol=0, atol=1e-5)


def test_bleu_papineni_worked_example():
    """Papineni et al. 2002, sec. 2.1: modified unigram / bigram precisions 17/18, 10/17 for
    candidate 1 and 8/14, 1/13 for candidate 2 (reference lengths 16, 18, 16), and 2/7 for
    'the the the the the the the'; corpus precisions sum numerators and denominators."""
    refs = [_PAPINENI_REFS]
    one = bleu([_PAPINENI_1], refs)                         # 18 words, closest ref 18: BP 1
    assert one["bleu1"] == pytest.approx(17 / 18, abs=1e-6)
    assert one["bleu2"] == pytest.approx(math.sqrt(17 / 18 * 10 / 17), abs=1e-6)
    two = bleu([_PAPINENI_2], refs)                         # 14 words, closest ref 16
    bp = math.exp(1 - 16 / 14)
    assert two["bleu1"] == pytest.approx(8 / 14 * bp, abs=1e-6)
    assert two["bleu2"] == pytest.approx(math.sqrt(8 / 14 * 1 / 13) * bp, abs=1e-6)
    both = bleu([_PAPINENI_1, _PAPINENI_2], refs * 2)       # C = 32, R = 18 + 16
    bp = math.exp(1 - 34 / 32)
    assert both["bleu1"] == pytest.approx(25 / 32 * bp, abs=1e-6)
    assert both["bleu2"] == pytest.approx(math.sqrt(25 / 32 * 11 / 30) * bp, abs=1e-6)
    clipped = bleu(["the the the the the the the"],
                   [["The cat is on the mat.", "There is a cat on the mat."]])
    assert clipped["bleu1"] == pytest.approx(2 / 7, abs=1e-6)


def test_identical_and_disjoint_candidates():
    refs = [["a large red circle above a small blue cross.", "a red circle over a cross."],
            ["one green square on a dark background.", "a green square."]]
    same = bleu([refs[0][0], refs[1][0]], refs)
    assert all(v == pytest.approx(1.0, abs=1e-8) for v in same.values())
    disjoint = bleu(["dogs barking loudly outside", "an orange diamond"], refs)
    assert all(0.0 <= v < 1e-12 for v in disjoint.values())
    score, per_example = cider_d(["dogs barking loudly outside", "an orange diamond"], refs)
    assert score == 0.0 and np.all(per_example == 0.0)


def test_cider_d_hand_computed_and_order_invariant():
    # N = 2, one reference each, candidate = reference: idf log 2 for every n-gram, cosine 1
    # for n = 1, 2; no 3- or 4-grams in a 2-word caption: 10 * mean(1, 1, 0, 0) = 5
    score, per_example = cider_d(["red circle", "blue square"], [["red circle"], ["blue square"]])
    np.testing.assert_allclose(per_example, [5.0, 5.0], rtol=1e-12)
    candidates, references = REFERENCE_SETS["mixed"]
    order = np.random.default_rng(0).permutation(len(candidates))
    _, shuffled = cider_d([candidates[i] for i in order], [references[i] for i in order])
    np.testing.assert_allclose(shuffled, np.asarray(PYCOCOEVALCAP["mixed"][2])[order],
                               rtol=0, atol=1e-5)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="2 candidates but 1 reference"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="example 1 has no references"):
        cider_d(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="no examples"):
        caption_scores([], [])
    with pytest.raises(TypeError, match="references\\[0\\]"):
        bleu(["a red circle"], ["a red circle"])
    with pytest.raises(ValueError, match="captions but"):
        attribute_accuracy(["a red circle"], [])


def test_caption_scores_reports_x100_and_attributes():
    candidates, references = REFERENCE_SETS["shapes_world_5refs"]
    out = caption_scores(candidates, references)
    want_bleu, want_cider, _ = PYCOCOEVALCAP["shapes_world_5refs"]
    assert list(out) == ["bleu1", "bleu2", "bleu3", "bleu4", "cider"]
    np.testing.assert_allclose([out[f"bleu{n}"] for n in range(1, 5)],
                               100 * np.asarray(want_bleu), rtol=1e-6)
    assert out["cider"] == pytest.approx(100 * want_cider, abs=1e-3)
    scenes = _scenes(3)
    with_scenes = caption_scores([shapes_world.canonical_caption(s) for s in scenes],
                                 [[shapes_world.canonical_caption(s)] for s in scenes], scenes)
    assert with_scenes["main_object_acc"] == 100.0
    assert set(with_scenes) == set(out) | set(attribute_accuracy(["x"], scenes[:1]))


# ----------------------------------------------------------------------------- shapes world

ATTRIBUTE_KEYS = ("main_colour_acc", "main_shape_acc", "main_object_acc", "object_count_acc",
                  "all_objects_acc", "relation_acc")


def _scenes(n, first_seed=0):
    return [shapes_world.sample_scene(np.random.default_rng(s)) for s in range(first_seed,
                                                                                first_seed + n)]


def test_parse_caption_tolerates_garbage():
    parsed = parse_caption("um a big big red uh circle to the the left of of a small blue "
                           "blue square and over a purple beneath a cross, white")
    assert [(o.size, o.colour, o.shape) for o in parsed.objects] == [
        ("large", "red", "circle"), ("small", "blue", "square")]   # purple: phrase before shape
    assert [r.relation for r in parsed.relations] == ["left of", "above", "below"]
    joined = parse_caption("a big red-circle.left of a blue square")
    assert [(o.size, o.colour, o.shape) for o in joined.objects] == [
        ("large", "red", "circle"), (None, "blue", "square")]
    assert [r.relation for r in joined.relations] == ["left of"]
    # a wording is read from where it starts: "on the right of", not the "right of" inside it
    (phrase,) = parse_caption("a red circle on the right of a cross").relations
    assert (phrase.relation, phrase.start, phrase.end) == ("right of", 3, 7)


def test_true_captions_score_100():
    scenes = _scenes(150)
    canonical = attribute_accuracy([shapes_world.canonical_caption(s) for s in scenes], scenes)
    assert canonical == {**{k: 100.0 for k in ATTRIBUTE_KEYS}, "relation_stated": 100.0,
                         "chance_main_object": 100.0 / 40}
    rng = np.random.default_rng(1)
    refs = [shapes_world.describe_many(s, rng, 5) for s in scenes]
    drawn = attribute_accuracy(sum(refs, []), [s for s in scenes for _ in range(5)])
    assert all(drawn[k] == 100.0 for k in ATTRIBUTE_KEYS)
    # relation_stated < 100 by design: the listing template ("a, b and c") states no relation
    phrases = [p for words in shapes_world.RELATION_WORDS.values() for p in words]
    multi = [c for s, rs in zip(scenes, refs) if len(s["objects"]) > 1 for c in rs]
    stating = [any(f" {p} " in c for p in phrases) for c in multi]
    assert 50 < drawn["relation_stated"] < 100
    assert drawn["relation_stated"] == pytest.approx(100 * np.mean(stating))


def test_captions_of_other_scenes_score_low():
    scenes = _scenes(200)
    captions = [shapes_world.canonical_caption(s) for s in scenes]
    out = attribute_accuracy(captions[1:] + captions[:1], scenes)
    assert out["main_object_acc"] < 10 and out["all_objects_acc"] < 10
    assert out["main_colour_acc"] < 25 and out["main_shape_acc"] < 30
    assert out["object_count_acc"] < 50 and out["relation_acc"] < 50
    nothing = attribute_accuracy(["a picture of nothing."] * 3, scenes[:3])
    assert all(nothing[k] == 0.0 for k in ATTRIBUTE_KEYS[:5])
    assert math.isnan(nothing["relation_acc"])        # no caption states a relation


def test_main_colour_swap_loses_only_main_colour():
    scenes = _scenes(40)
    m = next(i for i, s in enumerate(scenes) if len(s["objects"]) > 1)
    wrong = copy.deepcopy(scenes[m])
    main = wrong["objects"][0]
    main["colour"] = next(c for c in shapes_world.COLOUR_NAMES if c != main["colour"])
    captions = [shapes_world.canonical_caption(s) for s in scenes]
    captions[m] = shapes_world.canonical_caption(wrong)
    out = attribute_accuracy(captions, scenes)
    lost = 100.0 * 39 / 40
    # the mentioned multiset changes with the colour, so all_objects_acc drops with it
    assert {k: out[k] for k in ATTRIBUTE_KEYS} == {
        "main_colour_acc": lost, "main_shape_acc": 100.0, "main_object_acc": lost,
        "object_count_acc": 100.0, "all_objects_acc": lost, "relation_acc": 100.0}


def test_reversed_relation_loses_only_relation():
    scenes = _scenes(40)
    multi = [i for i, s in enumerate(scenes) if len(s["objects"]) > 1]
    captions = [shapes_world.canonical_caption(s) for s in scenes]
    captions[multi[0]] = shapes_world.swapped_caption(scenes[multi[0]], "relation")
    assert captions[multi[0]] != shapes_world.canonical_caption(scenes[multi[0]])
    out = attribute_accuracy(captions, scenes)
    assert out["relation_acc"] == pytest.approx(100.0 * (len(multi) - 1) / len(multi))
    assert all(out[k] == 100.0 for k in ATTRIBUTE_KEYS[:5]) and out["relation_stated"] == 100.0
    assert out["chance_main_object"] == CHANCE_MAIN_OBJECT


def test_related_object_is_found_by_colour_and_shape_then_by_position():
    scene = {"objects": [{"colour": "red", "shape": "circle"},
                         {"colour": "blue", "shape": "square"},
                         {"colour": "green", "shape": "cross"}],
             "relations": [{"subject": 0, "object": 1, "relation": "left of"},
                           {"subject": 0, "object": 2, "relation": "above"}]}
    cases = {"a red circle above a green cross.": 100.0,         # object 2, object 1 left out
             "a red circle left of a white square.": 100.0,      # no white square: position 1
             "a red circle left of a green cross.": 0.0,         # object 2 is below, not left
             "a red circle above.": 0.0,                         # nothing after the phrase
             "a red circle and a green cross.": float("nan")}    # no relation stated
    for caption, want in cases.items():
        got = attribute_accuracy([caption], [scene])["relation_acc"]
        assert got == want or (math.isnan(want) and math.isnan(got)), caption
