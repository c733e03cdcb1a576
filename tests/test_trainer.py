"""End-to-end: the CLIP experiment trains on the shapes data, learns, checkpoints and resumes."""
import json
import os

import jax
import numpy as np
import pytest

from vlp_jax.config_args import load_config
from vlp_jax.train.checkpoint import Checkpointer
from vlp_jax.train.metrics_log import read_metrics
from vlp_jax.train.trainer import Experiment, train_and_evaluate
from tests.helpers import restore_state, tiny_clip_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_short_run_lowers_loss_and_writes_outputs(shapes_data_config, tmp_path):
    config = tiny_clip_config(shapes_data_config, steps=100)
    result = train_and_evaluate(config, str(tmp_path), progress=False)
    rows = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert result["step"] == 100
    with open(tmp_path / "eval.json") as f:
        evals = json.load(f)
    for key in ("zeroshot/top1", "retrieval/i2t_r1", "retrieval/t2i_r10"):
        assert key in evals, sorted(evals)
    assert os.path.isdir(tmp_path / "tensorboard")


def test_resumed_run_continues_from_the_saved_step_exactly(shapes_data_config, tmp_path):
    config = tiny_clip_config(shapes_data_config, steps=12, checkpoint_every=4)
    config.evals = {}
    straight = tmp_path / "straight"
    train_and_evaluate(config, str(straight), progress=False)
    resumed = tmp_path / "resumed"
    first = train_and_evaluate(config, str(resumed), progress=False, stop_at=6)
    assert first["step"] == 6
    second = train_and_evaluate(config, str(resumed), progress=False)
    assert second["step"] == 12
    steps_logged = [r["step"] for r in read_metrics(str(resumed)) if "train/loss" in r]
    assert steps_logged == sorted(set(steps_logged)), "resume repeated or skipped logged steps"
    exp = Experiment(config)
    params = [restore_state(exp, wd, step=12).params for wd in (straight, resumed)]
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_clip_learns_zero_shot_far_above_chance(trained_clip):
    """The session's tiny CLIP (300 steps at batch 64) on held-out scenes."""
    ev = trained_clip["eval"]
    chance = ev["zeroshot/chance"]
    assert ev["zeroshot/top1"] > 3 * chance, ev
    assert ev["retrieval/t2i_r10"] > 3 * 10 / 128 * 100, ev   # 128 images: chance R@10 = 7.8%
