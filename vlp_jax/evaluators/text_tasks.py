"""VL-T5 evaluation (Cho et al. 2021, "Unifying Vision-and-Language Tasks via Text
Generation"): every task is answered as text by the method's `generate_prompted` predict
function, given the image and the task input with its prefix, and scored by exact match.

On the split's scenes (`EvalSet.scenes`, the shapes world) the task inputs are built with
`vlp_jax.data.shapes_tasks` from a generator seeded with `seed` (the same set every run):
`questions_per_scene` VQA questions per scene ("vqa: <question>"), one grounding phrase
("ground: <the phrase>" -> its 3 x 3 grid region) and one SNLI-VE hypothesis ("entail:
<hypothesis>" -> entailment / neutral / contradiction), and, where the split has reference
captions, one caption ("caption:"). A generated text and a target match when they are equal
after lower-casing, dropping '.' / '?' and collapsing spaces; captions are scored as the
`captioning` evaluator scores them (`caption_metrics.caption_scores`: BLEU, CIDEr-D and the
attribute accuracies against the scene), under the prefix `caption_`.

Metrics (percent): vqa_acc (exact match), vqa_soft_acc (VQA v2's min(1, matches / 3) against
the 10 annotators' answers), vqa_<type> for each answer type (vqa_colour, vqa_shape,
vqa_count, vqa_yes/no, vqa_relation), grounding_acc, snli_ve_acc, each accuracy with its
`<name>_chance` (uniform guessing among the type's answers: 1 / 8 colours, 1 / 5 shapes, 1 / 3
counts, 1 / 2, 1 / 4 relations, 1 / 9 regions, 1 / 3 labels; vqa_acc's and vqa_soft_acc's is
the mean over the questions asked), caption_bleu4 / caption_cider / caption_main_colour_acc
/ ... (the captioning evaluator's names), counts n_vqa / n_grounding / n_snli_ve / n_caption,
seconds (generation wall time).
"""
from __future__ import annotations

import re
import time
from typing import Any, Mapping

import numpy as np

from vlp_jax.config_schema import resolve_entry
from vlp_jax.data import shapes_tasks, shapes_world
from vlp_jax.evaluators.caption_metrics import caption_scores
from vlp_jax.evaluators.embed import map_in_batches
from vlp_jax.evaluators.protocol import PredictFns, detokenizer, require

CAPTION_PREFIX, VQA_PREFIX, GROUND_PREFIX, SNLI_VE_PREFIX = shapes_tasks.VLT5_PREFIXES
# answers a uniform guess chooses among, per VQA answer type
VQA_CHOICES = {"colour": len(shapes_world.COLOUR_NAMES), "shape": len(shapes_world.SHAPES),
               "count": len(shapes_world.COUNT_WORDS), "yes/no": 2,
               "relation": len(shapes_tasks.RELATION_ANSWERS)}
NUM_REGIONS = sum(len(row) for row in shapes_tasks.REGIONS)


def normalize_answer(text: str) -> str:
    """Lower case, '.' / '?' dropped, whitespace collapsed: 'Top left.' -> 'top left'."""
    return " ".join(re.sub(r"[.?]", " ", text.lower()).split())


def task_prompt(prefix: str, text: str) -> str:
    """The task input as `shapes_tasks.vlt5_examples` writes it: '<prefix> <text>'."""
    return f"{prefix} {text}".rstrip()


def build_tasks(scenes: list[dict], seed: int, questions_per_scene: int,
                captions: list[list[str]] | None = None) -> list[dict]:
    """[{"image": scene index, "task": 'vqa' | 'grounding' | 'snli_ve' | 'caption', "prompt":
    str, "target": str, "answers": [str] (VQA's 10; a caption task's references), "type": VQA
    answer type or None}], one generator seeded with `seed` drawn through the scenes in order;
    with `captions` (each scene's reference captions) a caption task per scene too (it draws
    nothing, so the other tasks are the same with or without it)."""
    if captions is not None and len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} caption lists for {len(scenes)} scenes")
    rng = np.random.default_rng(seed)
    tasks = []
    for i, scene in enumerate(scenes):
        for qa in shapes_tasks.vqa_questions(scene, rng, num=questions_per_scene):
            tasks.append(dict(image=i, task="vqa", prompt=task_prompt(VQA_PREFIX, qa["question"]),
                              target=qa["answer"], answers=qa["answers"],
                              type=qa["answer_type"]))
        ground = shapes_tasks.grounding_target(scene, rng)
        tasks.append(dict(image=i, task="grounding",
                          prompt=task_prompt(GROUND_PREFIX, ground["phrase"]),
                          target=ground["region"], answers=[ground["region"]], type=None))
        ve = shapes_tasks.snli_ve_hypothesis(scene, rng)
        tasks.append(dict(image=i, task="snli_ve",
                          prompt=task_prompt(SNLI_VE_PREFIX, ve["hypothesis"]),
                          target=ve["label"], answers=[ve["label"]], type=None))
        if captions is not None:
            refs = [str(c) for c in captions[i]]
            tasks.append(dict(image=i, task="caption", prompt=task_prompt(CAPTION_PREFIX, ""),
                              target=refs[0], answers=refs, type=None, scene=scene))
    return tasks


def text_task_scores(tasks: list[dict], predictions: list[str]) -> dict[str, float]:
    """The module's metrics from the tasks of `build_tasks` and one generated text each."""
    pred = [normalize_answer(p) for p in predictions]
    exact = np.array([p == normalize_answer(t["target"]) for p, t in zip(pred, tasks)], float)
    kind = np.array([t["task"] for t in tasks])
    out: dict[str, float] = {}
    vqa = [i for i, t in enumerate(tasks) if t["task"] == "vqa"]
    if vqa:
        soft = [min(1.0, sum(normalize_answer(a) == pred[i] for a in tasks[i]["answers"]) / 3.0)
                for i in vqa]
        chance = [100.0 / VQA_CHOICES[tasks[i]["type"]] for i in vqa]
        out.update(vqa_acc=100.0 * float(np.mean(exact[vqa])),
                   vqa_soft_acc=100.0 * float(np.mean(soft)),
                   vqa_acc_chance=float(np.mean(chance)),
                   vqa_soft_acc_chance=float(np.mean(chance)), n_vqa=float(len(vqa)))
        for answer_type, choices in VQA_CHOICES.items():
            rows = [i for i in vqa if tasks[i]["type"] == answer_type]
            if rows:
                out[f"vqa_{answer_type}"] = 100.0 * float(np.mean(exact[rows]))
                out[f"vqa_{answer_type}_chance"] = 100.0 / choices
    for task, name, choices in (("grounding", "grounding_acc", NUM_REGIONS),
                                ("snli_ve", "snli_ve_acc", len(shapes_tasks.SNLI_VE_LABELS))):
        rows = kind == task
        if rows.any():
            out[name] = 100.0 * float(np.mean(exact[rows]))
            out[f"{name}_chance"] = 100.0 / choices
            out[f"n_{task}"] = float(rows.sum())
    caption = [i for i, t in enumerate(tasks) if t["task"] == "caption"]
    if caption:
        scores = caption_scores([predictions[i] for i in caption],
                                [tasks[i]["answers"] for i in caption],
                                [tasks[i]["scene"] for i in caption])
        out.update({f"caption_{k}": v for k, v in scores.items()}, n_caption=float(len(caption)))
    return out


def evaluate_text_tasks(config: Mapping[str, Any], predict: PredictFns, load_eval_set_fn,
                        tokenize_fn) -> dict[str, float]:
    config = resolve_entry("evals", "text_tasks", config, type="text_tasks")
    generate = require(predict, "generate_prompted", "text_tasks")
    decode = detokenizer(tokenize_fn, "text_tasks")
    ds = load_eval_set_fn(config.split, config.max_examples)
    if not ds.scenes:
        raise ValueError("evaluator type 'text_tasks' needs scenes (the shapes world's splits)")
    tasks = build_tasks(list(ds.scenes), config.seed, config.questions_per_scene,
                        [list(c) for c in ds.captions] if ds.captions else None)
    images = np.asarray(ds.images)[[t["image"] for t in tasks]]
    prompts = np.asarray(tokenize_fn([t["prompt"] for t in tasks]))
    start = time.perf_counter()
    tokens = map_in_batches(generate, [images, prompts], config.batch_size)
    seconds = time.perf_counter() - start
    return dict(text_task_scores(tasks, decode(tokens)), seconds=seconds)
