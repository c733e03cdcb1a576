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


# ------------------------------------------------- config.init / config.frozen, errors

def test_splice_mapped_copies_a_source_prefix_into_another_destination():
    from vlp_jax.train.warm_start import WarmStartError, check_mapping, splice_mapped
    params = {"a": {"w": np.zeros((2, 3), np.float32)}, "b": {"w": np.zeros(4, np.float32)}}
    loaded = {"src": {"deep": {"w": np.ones((2, 3))}}}
    out = splice_mapped(params, loaded, {"a": "src/deep"})
    assert out["a"]["w"].dtype == np.float32 and (out["a"]["w"] == 1).all()
    assert out["b"] is params["b"]
    with pytest.raises(WarmStartError, match="'b' from 'src/deep'"):
        splice_mapped(params, loaded, {"b": "src/deep"})
    with pytest.raises(WarmStartError, match="has no parameter subtree 'nope'"):
        splice_mapped(params, loaded, {"a": "nope"})
    with pytest.raises(ValueError, match="overlap"):
        check_mapping({"a": "x", "a/w": "y"})
    with pytest.raises(ValueError, match="mapping is empty"):
        check_mapping({})


def _lit_config(shapes_data_config, clip_workdir, steps):
    from tests.helpers import tiny_experiment
    config = tiny_experiment(shapes_data_config, f"lit_shapes.py:smoke,init={clip_workdir}",
                             steps=steps)
    config.evals = {}
    return config


def test_init_copies_mapped_subtrees_after_init_and_frozen_ones_never_move(
        trained_clip, shapes_data_config, tmp_path):
    from tests.helpers import restore_state
    from vlp_jax.train.freeze import param_paths
    from vlp_jax.train.step import init_params
    from vlp_jax.train.trainer import Experiment, train_and_evaluate
    source = restore_state(Experiment(trained_clip["config"]), trained_clip["workdir"]).params
    config = _lit_config(shapes_data_config, trained_clip["workdir"], steps=4)
    exp = Experiment(config)
    state = exp.new_state()
    fresh = jax.device_get(init_params(exp.method, exp._rng, exp.data.example_shapes(),
                                       exp.shardings.params))
    for leaf, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(exp.shardings.params)):
        assert leaf.sharding == sharding                  # placed onto the param shardings
    start = jax.device_get(state.params)
    mapped = ("image_tower", "image_proj")
    for name in start:
        expected = source[name] if name in mapped else fresh[name]
        for a, b in zip(jax.tree.leaves(start[name]), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(start["text_proj"]["kernel"], source["text_proj"]["kernel"])
    # no optimizer moments for the frozen parameters; moments for the trained ones
    moments = param_paths(exp.abstract_state.opt_state)
    assert not [p for p in moments if "image_tower" in p or "image_proj" in p]
    assert [p for p in moments if "text_tower" in p]

    train_and_evaluate(config, str(tmp_path), progress=False)
    after = restore_state(exp, tmp_path, step=4).params
    for name in mapped:
        for a, b in zip(jax.tree.leaves(after[name]), jax.tree.leaves(source[name])):
            np.testing.assert_array_equal(a, b)           # bitwise unchanged after 4 steps
    assert not np.array_equal(after["text_proj"]["kernel"], start["text_proj"]["kernel"])


def test_old_method_keys_raise_naming_the_new_ones(shapes_data_config):
    from tests.helpers import tiny_clip_config
    from vlp_jax.train.trainer import Experiment
    for key, value, new in (("warm_start", dict(workdir="x"), "config.init"),
                            ("frozen", ["image_tower"], "config.frozen")):
        config = tiny_clip_config(shapes_data_config)
        config.method[key] = value
        with pytest.raises(ValueError, match=f"method.{key} was replaced by the top-level {new}"):
            Experiment(config)


def test_eval_without_checkpoints_or_of_another_model_raises_one_line_errors(
        trained_clip, shapes_data_config, tmp_path):
    from tests.helpers import tiny_clip_config
    from vlp_jax.train.errors import CheckpointMismatchError, NoCheckpointError
    from vlp_jax.train.trainer import evaluate_checkpoint
    config = tiny_clip_config(shapes_data_config)
    config.evals = {}
    with pytest.raises(NoCheckpointError) as err:
        evaluate_checkpoint(config, str(tmp_path / "empty"))
    assert "\n" not in str(err.value) and "checkpoints" in str(err.value)
    with pytest.raises(NoCheckpointError, match="no checkpoint step 7"):
        evaluate_checkpoint(config, trained_clip["workdir"], step=7)
    config.model.embed_dim = 16                            # another model
    with pytest.raises(CheckpointMismatchError) as err:
        evaluate_checkpoint(config, trained_clip["workdir"])
    message = str(err.value)
    assert "\n" not in message and "does not match this model" in message, message
    assert "shape differs" in message and "shape differs" in err.value.details


def test_init_works_for_a_method_with_an_ema_teacher(tmp_path):
    """ALBEF: the momentum teacher is initialised from the parameters *after* the mapped
    subtree was copied in, so teacher and student start from the checkpoint alike."""
    import flax.linen as nn
    import ml_collections
    from tests.helpers import albef_cfg
    from vlp_jax.methods.registry import build_method
    from vlp_jax.parallel.mesh import make_mesh
    from vlp_jax.train.freeze import path_of
    from vlp_jax.train.optim import make_optimizer
    from vlp_jax.train.step import init_params, init_state, state_shardings
    vocab = dict(vocab_size=50, pad_id=0, bos_id=1, eos_id=2, mask_id=3)
    cfg = ml_collections.ConfigDict(dict(model=albef_cfg(),
                                         method=dict(name="albef", queue_size=40)))
    method = build_method(cfg, vocab, make_mesh(devices=jax.devices()[:1]))
    batch = dict(image=np.zeros((4, 16, 16, 3), np.float32), text=np.zeros((4, 8), np.int32))
    optim = ml_collections.ConfigDict(dict(lr=1e-3))
    tx, _, sh = state_shardings(method, lambda m: make_optimizer(optim, 10, m),
                                jax.random.key(0), batch, ())
    source = jax.device_get(init_params(method, jax.random.key(1), batch, sh.params))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), every=1)
    ckpt.save(3, {"params": source}, {}, force=True)
    ckpt.close()
    init = ml_collections.ConfigDict(dict(workdir=str(tmp_path), step=-1,
                                          mapping={"image_tower": "image_tower"}))
    state = jax.device_get(init_state(method, tx, jax.random.key(0), batch, sh, init=init))
    fresh = jax.device_get(init_params(method, jax.random.key(0), batch, sh.params))
    for a, b in zip(jax.tree.leaves(state.params["image_tower"]),
                    jax.tree.leaves(source["image_tower"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(state.params["text_encoder"]),
                    jax.tree.leaves(fresh["text_encoder"])):
        np.testing.assert_array_equal(a, b)
    copies = [(path_of(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(state.aux)
              if "image_tower" in path_of(p)]
    assert copies                                           # the teacher holds the tower
    flat_source = {path_of(p): leaf for p, leaf in
                   jax.tree_util.tree_leaves_with_path(source["image_tower"])}
    for path, leaf in copies:
        np.testing.assert_array_equal(leaf, flat_source[path.split("image_tower/", 1)[1]])
