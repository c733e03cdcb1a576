"""Checkpoints: atomic, pickle-free, and a clear error when written for another model."""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.train.checkpoint import CheckpointMismatchError, Checkpointer


def _state(width=3):
    return {"params": {"dense": {"kernel": jnp.ones((2, width)), "bias": jnp.zeros(width)}},
            "step": jnp.array(5, jnp.int32)}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_round_trip_restores_arrays_and_data_state(tmp_path):
    ckpt = Checkpointer(str(tmp_path), every=1)
    ckpt.save(5, _state(), {"position": 17}, force=True)
    ckpt.wait()
    state, data = ckpt.restore(_abstract(_state()))
    ckpt.close()
    np.testing.assert_array_equal(state["params"]["dense"]["kernel"], np.ones((2, 3)))
    assert data == {"position": 17}


def test_mismatching_model_lists_keys_and_shapes(tmp_path):
    ckpt = Checkpointer(str(tmp_path), every=1)
    ckpt.save(1, _state(width=3), {}, force=True)
    ckpt.wait()
    other = _state(width=4)
    other["params"]["extra"] = jnp.zeros(2)
    with pytest.raises(CheckpointMismatchError) as err:
        ckpt.restore(_abstract(other))
    ckpt.close()
    msg = str(err.value)
    assert "params/dense/kernel checkpoint (2, 3) vs model (2, 4)" in msg
    assert "missing in checkpoint: params/extra" in msg


def test_checkpoints_contain_no_pickles(tmp_path):
    ckpt = Checkpointer(str(tmp_path), every=1)
    ckpt.save(1, _state(), {"position": 1}, force=True)
    ckpt.close()
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                head = f.read(2)
            assert head[:1] != b"\x80", f"{name} looks like a pickle"
            assert not name.endswith((".pkl", ".pickle"))


def test_interrupted_save_is_never_listed_as_valid(tmp_path):
    """A step directory left without orbax's commit marker (a killed writer) is not restored."""
    ckpt = Checkpointer(str(tmp_path), every=1)
    ckpt.save(1, _state(), {"position": 1}, force=True)
    ckpt.close()
    # Simulate a writer killed mid-save of step 2: orbax writes into a temporary directory
    # and renames it only when complete.
    os.makedirs(tmp_path / "2.orbax-checkpoint-tmp-1234" / "state")
    ckpt = Checkpointer(str(tmp_path), every=1)
    assert ckpt.latest_step() == 1
    state, data = ckpt.restore(_abstract(_state()))
    ckpt.close()
    assert data == {"position": 1}


_WRITER = r"""
import sys, time
import jax.numpy as jnp
from vlp_jax.train.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], every=1)
ckpt.save(1, {"w": jnp.full((64, 1024, 1024), 1.0)}, {"position": 1}, force=True)
ckpt.wait()
ckpt.save(2, {"w": jnp.full((64, 1024, 1024), 2.0)}, {"position": 2}, force=True)
print("saving", flush=True)
time.sleep(60)
"""


def test_process_killed_during_save_leaves_the_previous_checkpoint_valid(tmp_path):
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
    try:
        assert proc.stdout.readline().strip() == "saving"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    ckpt = Checkpointer(str(tmp_path), every=1)
    step = ckpt.latest_step()
    assert step in (1, 2)
    abstract = {"w": jax.ShapeDtypeStruct((64, 1024, 1024), jnp.float32)}
    state, data = ckpt.restore(abstract)
    ckpt.close()
    assert data == {"position": step}
    assert float(state["w"][0, 0, 0]) == float(step) and float(state["w"][-1, -1, -1]) == step
