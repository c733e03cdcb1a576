"""Shared pytest set-up.

Eight simulated CPU devices are requested here, before anything imports jax, so the
multi-device tests (shard_map losses, sharded train steps) run on any machine.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
