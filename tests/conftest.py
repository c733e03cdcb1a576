"""Shared pytest set-up.

Eight simulated CPU devices are requested here, before anything imports jax, so the
multi-device tests (shard_map losses, sharded train steps) run on any machine.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """A TFDS data dir holding the tiny shapes dataset (`tiny_data_config()`: 24 px, 512 / 128 /
    128 examples), built once per test session. Under pytest-xdist the workers share the
    session's base temp dir; the builder's file lock lets one build while the others wait."""
    from vlp_jax.data.pipeline import tiny_data_config
    from vlp_jax.data.shapes_builder import ensure_built
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    data_dir = str(root / "vlp_jax_shapes_data")
    ensure_built(tiny_data_config(data_dir=data_dir))
    return data_dir


@pytest.fixture
def shapes_data_config(shapes_data_dir):
    """A fresh ConfigDict of the shared tiny dataset (built once per session): tests may
    modify it (e.g. `two_views`, `all_captions`) without affecting each other."""
    from vlp_jax.data.pipeline import tiny_data_config
    return tiny_data_config(data_dir=shapes_data_dir)
