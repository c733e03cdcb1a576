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
from tests.helpers import InstrumentedIterator, restore_state, tiny_clip_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_short_run_lowers_loss_and_writes_outputs(shapes_data_config, tmp_path):
    config = tiny_clip_config(shapes_data_config, steps=100)
    result = train_and_evaluate(config, str(tmp_path), progress=False)
    rows = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert result["step"] == 100
    # Every log line carries the utilisation figures (vlp_jax.train.flops).
    for r in rows:
        assert r["train/flops_per_step"] > 0
        assert 0.0 < r["train/mfu"] <= 1.0, r
        assert r["train/tflops_per_device"] > 0
        assert r["train/samples_per_sec_per_device"] == pytest.approx(
            r["train/examples_per_sec"] / config.mesh.num_devices)
        assert 0.0 <= r["train/data_wait_fraction"] <= 1.0
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


# ------------------------------------------------- the loop: periodic evals, no per-step sync

def _instrument(monkeypatch, bad_step=None):
    """Counts (iterators' get_state calls, preemption checks, traces per predict fn)."""
    from vlp_jax.methods.base import Method
    from vlp_jax.train import data_bridge, preemption
    iterators, checks, traces = [], [], {}
    original_iter = data_bridge.DataBridge.train_iterator

    def train_iterator(self, *a, **k):
        iterators.append(InstrumentedIterator(original_iter(self, *a, **k), bad_step))
        return iterators[-1]
    monkeypatch.setattr(data_bridge.DataBridge, "train_iterator", train_iterator)
    original_requested = preemption.PreemptionGuard.requested
    monkeypatch.setattr(preemption.PreemptionGuard, "requested",
                        lambda self: checks.append(1) or original_requested(self))
    original_fns = Method.predict_fns

    def predict_fns(self):
        def counted(name, fn):
            def traced(params, *inputs):
                traces[name] = traces.get(name, 0) + 1      # runs once per trace
                return fn(params, *inputs)
            return traced
        return {name: counted(name, fn) for name, fn in original_fns(self).items()}
    monkeypatch.setattr(Method, "predict_fns", predict_fns)
    return iterators, checks, traces


def test_evals_with_log_steps_run_during_training_and_compile_once(
        shapes_data_config, tmp_path, monkeypatch):
    iterators, checks, traces = _instrument(monkeypatch)
    config = tiny_clip_config(shapes_data_config, steps=12, log_every=4, checkpoint_every=6,
                              preemption_check_every=5)
    config.evals = {"zeroshot": dict(type="zero_shot", split="validation", max_examples=40,
                                     batch_size=16, log_steps=4)}
    train_and_evaluate(config, str(tmp_path), progress=False)
    rows = read_metrics(str(tmp_path))
    eval_steps = [r["step"] for r in rows if "eval/zeroshot/top1" in r]
    assert eval_steps == [4, 8, 12]                     # every 4 steps, the last one once
    assert all("train/loss" not in r for r in rows if "eval/zeroshot/top1" in r)
    # one trace per prediction function for three evaluations with changing parameters
    assert traces == {"encode_image": 1, "encode_text": 1}
    assert iterators[0].states == 2                     # data state only at saves (6, 12)
    assert len(checks) == 2                             # preemption checks at steps 5, 10


def test_nonfinite_stop_checks_at_log_steps_and_keeps_the_last_good_parameters(
        shapes_data_config, tmp_path, monkeypatch):
    from vlp_jax.train.errors import NonFiniteError
    _instrument(monkeypatch, bad_step=5)
    config = tiny_clip_config(shapes_data_config, steps=12, log_every=4, checkpoint_every=4,
                              nonfinite="stop")
    config.evals = {}
    with pytest.raises(NonFiniteError) as info:
        train_and_evaluate(config, str(tmp_path), progress=False)
    message = str(info.value)
    assert "at step 5 in [" in message and "'loss'" in message, message
    assert "after step 4" in message and "steps 6..8" in message, message
    exp = Experiment(config)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.manager.all_steps() == [4, 8]
    good, stopped = (jax.device_get(ckpt.restore(exp.restore_target(), s)[0]) for s in (4, 8))
    ckpt.close()
    assert int(stopped.step) == 8 and int(stopped.nonfinite) == 4   # steps 5-8 skipped
    for a, b in zip(jax.tree.leaves((good.params, good.opt_state)),
                    jax.tree.leaves((stopped.params, stopped.opt_state))):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- initialisation

def test_initialisation_traces_batch_one_and_does_not_depend_on_the_batch_size(
        shapes_data_config, monkeypatch):
    from vlp_jax.methods.contrastive import ContrastiveMethod
    seen = []
    original = ContrastiveMethod.init_params

    def init_params(self, rng, batch):
        seen.append({k: v.shape for k, v in batch.items()})
        return original(self, rng, batch)
    monkeypatch.setattr(ContrastiveMethod, "init_params", init_params)
    states = []
    for batch_size in (32, 64):
        exp = Experiment(tiny_clip_config(shapes_data_config, batch_size=batch_size))
        states.append(jax.device_get(exp.new_state()))
    res, length = shapes_data_config.image_size, shapes_data_config.text_length
    assert seen and all(s == {"image": (1, res, res, 3), "text": (1, length)} for s in seen)
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(a, b)
