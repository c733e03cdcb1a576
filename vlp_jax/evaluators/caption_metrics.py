"""Caption metrics: BLEU-1..4 and CIDEr-D as the COCO caption toolkit computes them, and the
shapes world's attribute accuracy of generated captions. Pure Python + numpy.

Every function takes raw strings and tokenises them with `normalize_caption` first.

BLEU (Papineni et al. 2002), corpus level, as pycocoevalcap's `Bleu` scorer (option 'closest'):

    p_n    = (sum_i clip_n(i) + 1e-15) / (sum_i max(0, c_i - n + 1) + 1e-9)
    clip_n(i) = sum over the n-grams g of candidate i of min(count_i(g), max_r count_r(g))
    BLEU-n = BP * (p_1 * ... * p_n) ** (1 / n)
    BP     = exp(1 - R / C) if C < R else 1  (with C = sum_i c_i + 1e-15, R = sum_i r_i + 1e-9)

c_i: candidate i's length; r_i: the length of its reference closest to c_i (the shorter one on
a tie). The constants 1e-15 / 1e-9 are the toolkit's: a corpus with no matching 4-gram gets a
tiny positive BLEU-4, not exactly 0, and a perfect precision reads about 1 - 1e-9 / count.

CIDEr-D (Vedantam et al. 2015: CIDEr with clipped counts, a Gaussian length penalty and no
stemming), as pycocoevalcap's `Cider`: each caption becomes, for every n, a tf-idf vector over
its n-grams,

    g_n(s)[w] = count_s(w) * (log N - log max(1, df(w))),

df(w) = the number of the N evaluated examples where w occurs in at least one reference (the
idf comes from the references of the set being scored, so one example alone scores 0). With
candidate c and references s_1..s_m of an example,

    CIDEr-D_n = (1/m) sum_j exp(-(l_c - l_j)^2 / (2 sigma^2))
                * <min(g_n(c), g_n(s_j)), g_n(s_j)> / (|g_n(c)| |g_n(s_j)|)
    CIDEr-D   = 10 * mean_{n=1..4} CIDEr-D_n

(raw counts, not length-normalised term frequencies, clipped element-wise against each
reference; a zero norm leaves the inner product, which is then 0, undivided). The corpus score
is the mean over examples. l is a length: the toolkit counts a caption's bigrams (words - 1),
which gives the same difference l_c - l_j as word counts whenever both captions have a word, and
the term is 0 otherwise, so word counts are used here.

Attribute accuracy: see `attribute_accuracy` (the caption grammar is shapes_world's).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import NamedTuple, Sequence

import numpy as np

from vlp_jax.data.shapes_world import COLOUR_NAMES, RELATION_WORDS, SHAPES, SIZE_WORDS

BLEU_TINY = 1e-15     # pycocoevalcap BleuScorer: added to match counts and candidate length
BLEU_SMALL = 1e-9     # ... and to the n-gram counts and the reference length
CIDER_SCALE = 10.0    # pycocoevalcap multiplies CIDEr-D by 10

# ----------------------------------------------------------------------------- tokenisation

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b"      # clitics, split off by _CLITIC
                    r"|(?:[^\W\d_]\.){2,}"           # abbreviations: u.s. e.g.
                    r"|\d+(?:,\d+)+(?:\.\d+)*"        # numbers with commas: 1,000
                    r"|\w+(?:[-/.']\w+)*"             # words: t-shirt 3.5 o'clock and/or
                    r"|[$%&#+=*@<>^~|/\\]")            # symbols PTB keeps as tokens


def normalize_caption(text: str) -> list[str]:
    """Lower-cased tokens of `text`, punctuation dropped: an approximation of the COCO
    evaluation's Stanford PTBTokenizer (-lowerCase) followed by pycocoevalcap's filter of the
    punctuation tokens '' ' `` ` . ? ! , : ; - -- ...

    As PTB does: clitics become tokens ("don't" -> "do n't", "cat's" -> "cat 's"); words joined
    by - / . ' stay whole ("t-shirt", "and/or", "3.5", "o'clock", even "circle.a"), as do
    "1,000" and abbreviations ("u.s.", "e.g."); $ % & # + = * @ < > are tokens of their own.
    Differs from PTB (checked against stanford-corenlp 3.4.1): brackets are dropped, where the
    toolkit keeps PTB's "-lrb-" / "-rrb-" / "-lsb-" ... (its filter lists them upper-case only);
    words PTB splits without an apostrophe stay whole ("cannot", "gonna"; PTB: "can not",
    "gon na"); titles lose their period ("mr."); repeated marks PTB keeps as one token ("!!")
    are dropped; "@home" and "<b>" split at the symbol (PTB keeps them whole); "'n'" loses its
    quotes; an apostrophe between digits joins them ("6'2"; PTB: "6", "2").
    """
    text = _CLITIC.sub(r" \1", text.lower().translate(_APOSTROPHES))
    return _TOKEN.findall(text)


def _prepare(candidates: Sequence[str], references: Sequence[Sequence[str]]
             ) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Tokenised candidates [N] and references [N][m_i], after checking the shapes."""
    if isinstance(candidates, str):
        raise TypeError("candidates must be a sequence of strings, got one string")
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference "
                         "lists; they must pair one to one")
    if not candidates:
        raise ValueError("no examples to score: candidates and references are empty")
    refs = []
    for i, example_refs in enumerate(references):
        if isinstance(example_refs, str):
            raise TypeError(f"references[{i}] must be a sequence of reference strings, got "
                            f"one string {example_refs!r}")
        if len(example_refs) == 0:
            raise ValueError(f"example {i} has no references")
        refs.append([normalize_caption(r) for r in example_refs])
    return [normalize_caption(c) for c in candidates], refs


def _ngram_counts(words: list[str], max_n: int) -> Counter:
    """Counts of every n-gram (a tuple of words) of `words`, n = 1..max_n."""
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1)
                   for i in range(len(words) - n + 1))


# ----------------------------------------------------------------------------- BLEU

def _bleu_tokens(cands: list[list[str]], refs: list[list[list[str]]], max_n: int
                 ) -> dict[str, float]:
    correct = np.zeros(max_n)                   # [max_n] clipped matches over the corpus
    guess = np.zeros(max_n)                     # [max_n] candidate n-grams over the corpus
    cand_len = ref_len = 0
    for cand, example_refs in zip(cands, refs):
        max_ref: dict[tuple, int] = {}
        for ref in example_refs:
            for gram, count in _ngram_counts(ref, max_n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), count)
        for gram, count in _ngram_counts(cand, max_n).items():
            correct[len(gram) - 1] += min(count, max_ref.get(gram, 0))
        guess += [max(0, len(cand) - n + 1) for n in range(1, max_n + 1)]
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in example_refs)[1]
    precision = (correct + BLEU_TINY) / (guess + BLEU_SMALL)
    scores = np.cumprod(precision) ** (1.0 / np.arange(1, max_n + 1))
    ratio = (cand_len + BLEU_TINY) / (ref_len + BLEU_SMALL)
    if ratio < 1:
        scores = scores * math.exp(1 - 1 / ratio)
    return {f"bleu{n}": float(scores[n - 1]) for n in range(1, max_n + 1)}


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
         ) -> dict[str, float]:
    """Corpus BLEU-1..max_n in [0, 1] as pycocoevalcap's Bleu scorer (module docstring):
    candidates [N] strings, references [N] lists of >= 1 strings -> {'bleu1': .., ...}.

    The toolkit scores only max_n <= 4; larger max_n follows the same formula.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    return _bleu_tokens(*_prepare(candidates, references), max_n)


# ----------------------------------------------------------------------------- CIDEr-D

def _tfidf(counts: Counter, log_n: float, df: Counter, max_n: int
           ) -> tuple[list[dict], np.ndarray]:
    """Per-n tf-idf vectors [max_n] {ngram: weight} and their L2 norms [max_n]."""
    vecs: list[dict] = [{} for _ in range(max_n)]
    for gram, count in counts.items():
        vecs[len(gram) - 1][gram] = count * (log_n - math.log(max(1.0, df[gram])))
    norms = np.array([math.sqrt(sum((w * w for w in v.values()), 0.0)) for v in vecs])
    return vecs, norms


def _cider_tokens(cands: list[list[str]], refs: list[list[list[str]]], max_n: int,
                  sigma: float) -> np.ndarray:
    cand_counts = [_ngram_counts(c, max_n) for c in cands]
    ref_counts = [[_ngram_counts(r, max_n) for r in rs] for rs in refs]
    df: Counter = Counter()                      # examples whose references hold the n-gram
    for example in ref_counts:
        df.update(set().union(*example))
    log_n = math.log(len(cands))
    scores = np.zeros(len(cands))                # [N]
    for i, (cand, counts, example_refs) in enumerate(zip(cands, cand_counts, ref_counts)):
        vec_c, norm_c = _tfidf(counts, log_n, df, max_n)
        total = np.zeros(max_n)                  # [max_n] summed over the references
        for ref, ref_c in zip(refs[i], example_refs):
            vec_r, norm_r = _tfidf(ref_c, log_n, df, max_n)
            sim = np.array([sum((min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0)
                                 for g, w in vec_c[n].items()), 0.0) for n in range(max_n)])
            both = (norm_c != 0) & (norm_r != 0)
            sim[both] /= norm_c[both] * norm_r[both]
            total += sim * math.exp(-float(len(cand) - len(ref)) ** 2 / (2 * sigma ** 2))
        scores[i] = CIDER_SCALE * total.mean() / len(example_refs)
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
            sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """CIDEr-D as pycocoevalcap's Cider scorer (module docstring): candidates [N] strings,
    references [N] lists of >= 1 strings -> (corpus score = mean of the per-example scores,
    per-example scores float64 [N]). Document frequencies come from these references, so the
    score of an example depends on the whole set; with N = 1 every weight is log 1 = 0.

    The toolkit runs only max_n = 4; other max_n average over n = 1..max_n likewise.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    scores = _cider_tokens(*_prepare(candidates, references), max_n, sigma)
    return float(scores.mean()), scores


# ----------------------------------------------------------------------------- shapes world

_COLOURS = frozenset(COLOUR_NAMES)
_SHAPES = frozenset(SHAPES)
_SIZE_OF_WORD = {word: size for size, words in SIZE_WORDS.items() for word in words}
# longest wording first, so that a wording holding another as its prefix would win
_RELATION_PHRASES = sorted(((tuple(p.split()), rel) for rel, phrases in RELATION_WORDS.items()
                            for p in phrases), key=lambda item: -len(item[0]))
_JOINERS = re.compile(r"[-/.']")
CHANCE_MAIN_OBJECT = 100.0 / (len(COLOUR_NAMES) * len(SHAPES))


class MentionedObject(NamedTuple):
    size: str | None        # 'small' / 'large' (from any synonym) or None
    colour: str
    shape: str
    start: int              # token index of the colour word


class MentionedRelation(NamedTuple):
    relation: str           # a key of shapes_world.RELATION_WORDS
    start: int              # token span [start, end) of the phrase
    end: int


class ParsedCaption(NamedTuple):
    objects: list[MentionedObject]
    relations: list[MentionedRelation]


def _relation_at(tokens: list[str], i: int) -> tuple[str, int] | None:
    """(relation, phrase length) of the longest relation phrase starting at token i."""
    for phrase, rel in _RELATION_PHRASES:
        if tuple(tokens[i:i + len(phrase)]) == phrase:
            return rel, len(phrase)
    return None


def parse_caption(text: str) -> ParsedCaption:
    """The objects and relation phrases a shapes-world caption mentions, in caption order.

    An object is a colour word with the next shape word after it (words in between, other
    colours included, are ignored; a relation phrase in between drops the colour); its size
    is the size word right before the colour, if any. A relation phrase is any wording in
    shapes_world.RELATION_WORDS, the longest match first. Every other word is skipped. Words
    are `normalize_caption`'s tokens split further at - / . ' (a generated "red-circle.left"
    reads as "red circle left").
    """
    tokens = [w for token in normalize_caption(text) for w in _JOINERS.split(token) if w]
    objects, relations = [], []
    i = 0
    while i < len(tokens):
        found = _relation_at(tokens, i)
        if found is not None:
            relations.append(MentionedRelation(found[0], i, i + found[1]))
            i += found[1]
            continue
        if tokens[i] in _COLOURS:
            j = i + 1
            while j < len(tokens) and tokens[j] not in _SHAPES and _relation_at(tokens, j) is None:
                j += 1
            if j < len(tokens) and tokens[j] in _SHAPES:
                size = _SIZE_OF_WORD.get(tokens[i - 1]) if i > 0 else None
                objects.append(MentionedObject(size, tokens[i], tokens[j], i))
                i = j + 1
                continue
        i += 1
    return ParsedCaption(objects, relations)


def _relation_correct(parsed: ParsedCaption, scene: dict) -> bool:
    """Whether the caption's first relation phrase is the scene's relation of objects[0] to
    the object mentioned right after it. That object is the scene object (other than the
    main one) of the same colour and shape; any of several such objects will do; if the
    scene holds none, the one at the mention's position (captions mention objects in scene
    order). No object after the phrase, or none at that position: incorrect."""
    phrase = parsed.relations[0]
    after = [k for k, o in enumerate(parsed.objects) if o.start >= phrase.end]
    if not after:
        return False
    k = after[0]
    mention, objects = parsed.objects[k], scene["objects"]
    truth = {r["object"]: r["relation"] for r in scene["relations"] if r["subject"] == 0}
    targets = [j for j in range(1, len(objects))
               if (objects[j]["colour"], objects[j]["shape"]) == (mention.colour, mention.shape)]
    if not targets and 1 <= k < len(objects):
        targets = [k]
    return any(truth.get(j) == phrase.relation for j in targets)


def _percent(hits: int, total: int) -> float:
    return 100.0 * hits / total if total else float("nan")


def attribute_accuracy(captions: Sequence[str], scenes: Sequence[dict]) -> dict[str, float]:
    """How truthful generated captions [N] are about their scenes [N] (shapes_world dicts), in
    percent over the examples, from `parse_caption`:

      main_colour_acc / main_shape_acc / main_object_acc: the first mentioned object has the
        colour / the shape / both of scene objects[0] (no object mentioned: wrong);
      object_count_acc: as many objects mentioned as the scene has;
      all_objects_acc: the mentioned (colour, shape) multiset is the scene's;
      relation_stated: of the scenes with >= 2 objects, those whose caption has a relation
        phrase (listings "a, b and c" have none);
      relation_acc: of those, the ones whose first relation phrase is right
        (`_relation_correct`); NaN where no caption states one (likewise relation_stated
        without multi-object scenes);
      chance_main_object: 100 / (colours x shapes), main_object_acc of a uniform guess.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of strings, got one string")
    if len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} captions but {len(scenes)} scenes; they must "
                         "pair one to one")
    if not captions:
        raise ValueError("no examples to score: captions and scenes are empty")
    hits: Counter = Counter()
    multi = stated = 0
    for caption, scene in zip(captions, scenes):
        parsed = parse_caption(caption)
        objects = scene["objects"]
        first = parsed.objects[0] if parsed.objects else None
        colour_ok = first is not None and first.colour == objects[0]["colour"]
        shape_ok = first is not None and first.shape == objects[0]["shape"]
        hits["main_colour_acc"] += colour_ok
        hits["main_shape_acc"] += shape_ok
        hits["main_object_acc"] += colour_ok and shape_ok
        hits["object_count_acc"] += len(parsed.objects) == len(objects)
        hits["all_objects_acc"] += (Counter((o.colour, o.shape) for o in parsed.objects)
                                    == Counter((o["colour"], o["shape"]) for o in objects))
        if len(objects) >= 2:
            multi += 1
            if parsed.relations:
                stated += 1
                hits["relation_acc"] += _relation_correct(parsed, scene)
    n = len(captions)
    out = {key: _percent(hits[key], n) for key in ("main_colour_acc", "main_shape_acc",
                                                    "main_object_acc", "object_count_acc",
                                                    "all_objects_acc")}
    out["relation_acc"] = _percent(hits["relation_acc"], stated)
    out["relation_stated"] = _percent(stated, multi)
    out["chance_main_object"] = CHANCE_MAIN_OBJECT
    return out


# ----------------------------------------------------------------------------- all at once

def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]],
                   scenes: Sequence[dict] | None = None) -> dict[str, float]:
    """bleu1..bleu4 and cider, x100 (the usual reporting scale: BLEU-4 27.3, CIDEr 90.1), plus
    `attribute_accuracy(candidates, scenes)`'s percentages when scenes [N] are given."""
    cands, refs = _prepare(candidates, references)
    out = {key: 100.0 * value for key, value in _bleu_tokens(cands, refs, 4).items()}
    out["cider"] = 100.0 * float(_cider_tokens(cands, refs, 4, 6.0).mean())
    if scenes is not None:
        out.update(attribute_accuracy(candidates, scenes))
    return out
