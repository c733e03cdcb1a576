"""benchmarks/gpu_clip.py runs end to end at its --tiny size on CPU (the JAX side; the open_clip
side only where benchmarks/.venv-openclip exists), and picks cuDNN attention on GPUs only."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_clip.py")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_clip", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env():
    """One CPU device; the suite's persistent compilation cache (see conftest.py)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return dict(env, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.environ.get(
        "VLP_JAX_TEST_CACHE", os.path.expanduser("~/.cache/vlp_jax/xla_test_cache")))


def test_attention_is_cudnn_on_gpu_only():
    pick = _module().attention_implementation
    assert pick("auto", "gpu") == "cudnn"
    assert pick("auto", "cpu") is None and pick("xla", "gpu") is None
    assert pick("cudnn", "gpu") == "cudnn"
    with pytest.raises(ValueError, match="--attention cudnn needs a GPU"):
        pick("cudnn", "cpu")


def test_tiny_run_prints_throughput_and_mfu(tmp_path):
    out_json = tmp_path / "r.json"
    out = subprocess.run([sys.executable, SCRIPT, "--tiny", "--no-open-clip",
                          f"--json={out_json}"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| vlp_jax (JAX" in out.stdout and "TFLOP/s per device" in out.stdout
    (row,) = json.loads(out_json.read_text())
    assert row["dtype"] == "bfloat16" and row["attention"] == "xla" and row["scan"]
    assert row["batch"] == 8 and row["samples_per_sec"] > 0
    sys.path.insert(0, ROOT)
    import ml_collections  # noqa: E402
    from vlp_jax.train.flops import dual_encoder_step_flops  # noqa: E402
    mod = _module()
    args = mod.parse_args(["--tiny"])
    cfg = mod.clip_config(args, None)
    assert row["model_flops_per_step"] == dual_encoder_step_flops(cfg.model, 8, 16)
    assert isinstance(cfg, ml_collections.ConfigDict)
    # mfu = model FLOPs / step time / peak, the figures in the row
    expected = row["model_flops_per_step"] / (row["step_ms"] / 1e3) / row["peak_flops_per_device"]
    assert row["mfu"] == pytest.approx(expected, rel=1e-9) and 0 < row["mfu"] < 1
    assert 0 < row["final_loss"] < 10   # finite: ~log(8) plus the random logits' spread


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "benchmarks", ".venv-openclip",
                                                    "bin", "python")),
                    reason="benchmarks/.venv-openclip is absent (the open_clip side)")
def test_tiny_open_clip_side_matches_the_model():
    mod = _module()
    args = mod.parse_args(["--tiny"])
    row = mod.bench_openclip(args)
    assert row["precision"] == "amp_bf16" and row["model"] == "custom"
    assert row["samples_per_sec"] > 0
    # open_clip's vision tower has one extra pre-LayerNorm (2 x width) over vlp_jax's: the
    # tiny vlp_jax CLIP has 155,649 parameters
    assert row["params"] == 155_649 + 2 * args.size["width"]
