"""ALIGN, SigLIP, FLIP and LiT train from their experiment files and learn.

Each test loads `experiments/<name>_shapes.py:smoke`, keeps what makes the method (the ResNet
tower and bidirectional CLS text encoder of ALIGN, the sigmoid loss of SigLIP, FLIP's patch
masking, LiT's locked warm-started image tower) and shrinks the rest to width-32 towers on
the session's tiny 24 px dataset. Learning means zero-shot top-1 (40 classes, chance 2.5%)
and text-to-image R@10 (128 images, chance 7.8%) at least 3x chance on held-out scenes.
"""
import os

import jax
import numpy as np
import pytest

from vlp_jax.config_args import load_config
from vlp_jax.train.checkpoint import Checkpointer
from vlp_jax.train.metrics_log import read_metrics
from vlp_jax.train.trainer import Experiment, train_and_evaluate
from tests.helpers import tiny_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _train(config, workdir):
    result = train_and_evaluate(config, str(workdir), progress=False)
    rows = [r for r in read_metrics(str(workdir)) if "train/loss" in r]
    return result["eval"], rows


def _assert_learns(ev, rows, name):
    print(name, {k: round(v, 2) for k, v in ev.items()})
    assert rows[-1]["train/loss"] < rows[0]["train/loss"], [r["train/loss"] for r in rows]
    assert ev["zeroshot/top1"] > 3 * ev["zeroshot/chance"], ev
    assert ev["retrieval/t2i_r10"] > 3 * 100 * 10 / 128, ev


def test_align_with_a_resnet_tower_learns(shapes_data_config, tmp_path):
    config = tiny_experiment(shapes_data_config, "align_shapes.py:smoke", steps=150)
    assert config.model.image.type == "resnet" and not config.model.text.causal
    ev, rows = _train(config, tmp_path)
    _assert_learns(ev, rows, "ALIGN")


def test_siglip_learns_with_its_bias(shapes_data_config, tmp_path):
    config = tiny_experiment(shapes_data_config, "siglip_shapes.py:smoke", steps=200)
    assert config.method.loss == "sigmoid"
    ev, rows = _train(config, tmp_path)
    _assert_learns(ev, rows, "SigLIP")


def test_flip_learns_from_half_of_the_patches(shapes_data_config, tmp_path):
    config = tiny_experiment(shapes_data_config, "flip_shapes.py:smoke,ratio=0.5", steps=200)
    assert config.method.mask_ratio == 0.5
    ev, rows = _train(config, tmp_path)
    _assert_learns(ev, rows, "FLIP")


def _restore_params(config, workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, _ = ckpt.restore(Experiment(config).restore_target())
    ckpt.close()
    return jax.device_get(state.params)


def test_lit_locks_a_pretrained_image_tower_and_learns(shapes_data_config, trained_clip,
                                                      tmp_path):
    clip, clip_dir = trained_clip["config"], trained_clip["workdir"]
    lit = tiny_experiment(shapes_data_config, f"lit_shapes.py:smoke,init={clip_dir}", steps=150)
    assert list(lit.frozen) == ["image_tower/.*", "image_proj/.*"]
    assert dict(lit.init.mapping) == {"image_tower": "image_tower", "image_proj": "image_proj"}
    ev, rows = _train(lit, tmp_path / "lit")
    _assert_learns(ev, rows, "LiT")
    before = _restore_params(clip, clip_dir)
    after = _restore_params(lit, tmp_path / "lit")
    for name in ("image_tower", "image_proj"):          # copied from CLIP, never moved
        for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
            np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["text_tower"]),
                                                      jax.tree.leaves(after["text_tower"]))]
    assert np.mean(moved) > 0.9, "the text tower trains"
