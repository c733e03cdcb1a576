"""Reliability end to end: `vlp-jax train` killed by SIGTERM exits 75 with a checkpoint at the
step it stopped and resumes to the same parameters as an uninterrupted run (on 8
devices); the 'stop' non-finite policy stops at the bad step, names it and the non-finite
metrics, and checkpoints the last good state."""
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vlp_jax.train.checkpoint import Checkpointer
from vlp_jax.train.metrics_log import read_metrics
from vlp_jax.train.preemption import EXIT_PREEMPTED
from vlp_jax.train.trainer import Experiment, NonFiniteError, train_and_evaluate
from tests.helpers import InstrumentedIterator, child_env, restore_state, tiny_clip_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30

EXPERIMENT = '''
import sys
sys.path.insert(0, {root!r})
from tests.helpers import tiny_clip_config
from vlp_jax.data.pipeline import tiny_data_config


def get_config():
    config = tiny_clip_config(tiny_data_config(data_dir={data_dir!r}), steps={steps},
                              log_every=2, checkpoint_every=1000, num_devices=None,
                              preemption_check_every=2)
    config.evals = {{}}
    return config
'''


def _config(data_dir):
    """The experiment file's config, built in this process (for restoring checkpoints)."""
    from vlp_jax.data.pipeline import tiny_data_config
    config = tiny_clip_config(tiny_data_config(data_dir=data_dir), steps=STEPS, log_every=2,
                              checkpoint_every=1000, num_devices=None, preemption_check_every=2)
    config.evals = {}
    return config


def _train(config_path, workdir, devices, preempt=False, timeout=120):
    """Runs `python -m vlp_jax.cli train` on `devices` CPU devices; with `preempt`, sends
    SIGTERM as soon as metrics.jsonl has a row. Returns (exit code, stderr)."""
    env = child_env(devices)
    cmd = [sys.executable, "-m", "vlp_jax.cli", "train", "--config", str(config_path),
           "--workdir", str(workdir), "--no_progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if preempt:
        deadline = time.monotonic() + timeout
        while not read_metrics(str(workdir)) and proc.poll() is None:
            assert time.monotonic() < deadline, "no metrics row before the deadline"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.mark.slow                   # three short CLI runs: ~60 s
def test_sigterm_checkpoints_exits_75_and_resumes_exactly(shapes_data_dir, tmp_path):
    """On 8 devices (sharded state and data): the signal path does not depend on the device
    count, and the 1-device exact resume is `test_trainer`'s in-process resume test (the
    1-device CLI variant was dropped to save ~40 s of the suite's budget)."""
    devices = 8
    config_path = tmp_path / "tiny_experiment.py"
    config_path.write_text(EXPERIMENT.format(root=ROOT, data_dir=shapes_data_dir, steps=STEPS))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    code, err = _train(config_path, resumed, devices, preempt=True)
    assert code == EXIT_PREEMPTED, err[-3000:]
    stopped = int(re.search(r"preempted: checkpoint written at step (\d+)", err).group(1))
    assert 2 <= stopped < STEPS      # checkpoint_every=1000: this save is the preemption's own
    ckpt = Checkpointer(str(resumed / "checkpoints"))
    assert ckpt.manager.all_steps() == [stopped]
    ckpt.close()

    code, err = _train(config_path, resumed, devices)
    assert code == 0, err[-3000:]
    code, err = _train(config_path, straight, devices)
    assert code == 0, err[-3000:]

    logged = [r["step"] for r in read_metrics(str(resumed)) if "train/loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == STEPS
    exp = Experiment(_config(shapes_data_dir))
    a, b = (restore_state(exp, w, step=STEPS).params for w in (straight, resumed))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- NaN 'stop'

def test_nonfinite_stop_names_step_and_metric_and_keeps_last_good_state(
        shapes_data_config, tmp_path, monkeypatch):
    from vlp_jax.train import data_bridge
    bad_step = 5
    original = data_bridge.DataBridge.train_iterator
    monkeypatch.setattr(data_bridge.DataBridge, "train_iterator",
                        lambda self, *a, **k: InstrumentedIterator(original(self, *a, **k),
                                                                bad_step))
    config = tiny_clip_config(shapes_data_config, steps=10, nonfinite="stop", checkpoint_every=1,
                              log_every=1)
    config.evals = {}
    with pytest.raises(NonFiniteError) as info:
        train_and_evaluate(config, str(tmp_path), progress=False)
    message = str(info.value)
    assert f"at step {bad_step} in [" in message and "'loss'" in message, message
    assert f"after step {bad_step - 1}" in message, message

    exp = Experiment(config)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.latest_step() == bad_step
    params = {}
    for step in (bad_step - 1, bad_step):
        state, _ = ckpt.restore(exp.restore_target(), step)
        params[step] = jax.device_get(state.params)
        assert int(state.step) == step
    ckpt.close()
    for x, y in zip(jax.tree.leaves(params[bad_step - 1]), jax.tree.leaves(params[bad_step])):
        np.testing.assert_array_equal(x, y)           # the bad update was not applied
        assert np.isfinite(y).all()
    logged = [r["step"] for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    assert logged == list(range(1, bad_step))         # nothing logged for the bad step

