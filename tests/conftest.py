"""Shared pytest set-up.

Eight simulated CPU devices are requested through `jax.config.update('jax_num_cpu_devices', 8)`
before any test initialises a backend: unlike `XLA_FLAGS`, it cannot be silently overridden by
a pre-set environment variable, and `_eight_devices` fails the session loudly if it did not
take effect (a 1-vs-8 device test would otherwise pass vacuously).

A persistent XLA compilation cache (`$VLP_JAX_TEST_CACHE`, default
`~/.cache/vlp_jax/xla_test_cache`) lets reruns skip compiling what they compiled before; the
budget of README command 2 is measured with it cold.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# LLVM optimisation level 1 instead of XLA:CPU's default 2: compiling is about half of the
# suite's cold time, and level 1 compiles ~30% faster with the same step time at the tests'
# sizes (the VL-T5 learning test: 11.6 -> 8.1 s of compile, 37 s warm either way); level 0
# doubles it (slow steps). Tests only: training and benchmarks keep XLA's default. Subprocess
# tests inherit it; a level set in XLA_FLAGS already wins.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=1"]))

import jax  # noqa: E402
import pytest  # noqa: E402

NUM_TEST_DEVICES = 8

jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "VLP_JAX_TEST_CACHE", os.path.expanduser("~/.cache/vlp_jax/xla_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    count = jax.device_count()
    if count != NUM_TEST_DEVICES:
        pytest.exit(f"the tests need {NUM_TEST_DEVICES} simulated CPU devices, jax has {count} "
                    f"({jax.devices()[0].platform}); something initialised jax before conftest",
                    returncode=3)


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """A TFDS data dir holding the tiny shapes dataset (`tiny_data_config()`: 24 px, 512 / 128 /
    128 examples), built once per test session. Under pytest-xdist the workers share the
    session's base temp dir; the builder's file lock lets one build while the others wait."""
    from vlp_jax.data.pipeline import tiny_data_config
    from vlp_jax.data.shapes_builder import ensure_built
    data_dir = str(_shared_root(tmp_path_factory) / "vlp_jax_shapes_data")
    ensure_built(tiny_data_config(data_dir=data_dir))
    return data_dir


def _shared_root(tmp_path_factory):
    """The temp dir every xdist worker of this session sees (their common parent)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture
def shapes_data_config(shapes_data_dir):
    """A fresh ConfigDict of the shared tiny dataset (built once per session): tests may
    modify it (e.g. `two_views`, `all_captions`) without affecting each other."""
    from vlp_jax.data.pipeline import tiny_data_config
    return tiny_data_config(data_dir=shapes_data_dir)


@pytest.fixture(scope="session")
def trained_clip(shapes_data_dir, tmp_path_factory):
    """A tiny CLIP (`experiments/clip_shapes.py:smoke` with width-32 towers, 300 steps at batch
    64, one device) trained once per test session: dict(config, workdir, eval). Tests that
    need a trained checkpoint (learning, LiT's warm start, evaluation) share it; under xdist
    the first worker trains while the others wait on a file lock, then read its results."""
    import json

    from filelock import FileLock

    from tests.helpers import tiny_experiment
    from vlp_jax.data.pipeline import tiny_data_config
    config = tiny_experiment(tiny_data_config(data_dir=shapes_data_dir), "clip_shapes.py:smoke",
                             steps=300)
    workdir = _shared_root(tmp_path_factory) / "trained_clip"
    done = workdir / "result.json"
    with FileLock(str(workdir) + ".lock"):
        if not done.exists():
            from vlp_jax.train.trainer import train_and_evaluate
            result = train_and_evaluate(config, str(workdir), progress=False)
            done.write_text(json.dumps({"eval": result["eval"]}))
    return dict(config=config, workdir=str(workdir), eval=json.loads(done.read_text())["eval"])
