"""The `vlp-jax` command line: flag overrides reach the config, including fields whose
default is None (typed placeholders)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_data_honours_data_dir_and_size_overrides(tmp_path):
    data_dir = tmp_path / "data"
    env = dict(os.environ, JAX_PLATFORMS="cpu", VLP_JAX_DATA_DIR=str(tmp_path / "not_here"))
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "vlp_jax.cli", "build-data",
           "--config", os.path.join(ROOT, "experiments", "clip_shapes.py") + ":smoke",
           f"--config.data.data_dir={data_dir}", "--config.data.num_train=32",
           "--config.data.num_validation=8", "--config.data.num_test=8",
           "--config.evals.zeroshot.max_examples=8"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = [d for d in os.listdir(data_dir / "vlp_shapes") if "n32-8-8" in d]
    assert built, os.listdir(data_dir / "vlp_shapes")
    assert not (tmp_path / "not_here").exists()
