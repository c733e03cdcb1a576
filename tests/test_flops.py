"""FLOP counting and utilisation: XLA's count of the step against the analytical formula,
the peak table, and the log line's figures."""
import jax
import ml_collections
import numpy as np
import pytest

from vlp_jax.train import flops


def test_analytical_dual_encoder_flops_match_xlas_count_of_the_train_step():
    """6 x (parameters x tokens) + attention terms of CLIP, against XLA's cost analysis of the
    lowered train step (which also counts element-wise ops and AdamW)."""
    from vlp_jax.methods.registry import build_method
    from vlp_jax.parallel.mesh import make_mesh
    from vlp_jax.parallel.sharding import DEFAULT_RULES
    from vlp_jax.train.optim import make_optimizer
    from vlp_jax.train.step import make_train_step, state_shardings
    model = ml_collections.ConfigDict(dict(
        name="dual_encoder", embed_dim=128,
        image=dict(type="vit", patch_size=4, width=128, depth=2, num_heads=4, image_size=32),
        text=dict(width=128, depth=2, num_heads=4, context_length=16)))
    vocab = dict(vocab_size=256, pad_id=0, bos_id=1, eos_id=2, mask_id=4)
    mesh = make_mesh(ml_collections.ConfigDict(dict(num_devices=1)))
    method = build_method(ml_collections.ConfigDict(dict(model=model, method=dict(
        name="contrastive"))), vocab, mesh)
    b = 32
    batch = dict(image=jax.ShapeDtypeStruct((b, 32, 32, 3), np.float32),
                 text=jax.ShapeDtypeStruct((b, 16), np.int32))
    tx, abstract, shardings = state_shardings(
        method, lambda m: make_optimizer(ml_collections.ConfigDict(dict(lr=1e-3)), 10, m),
        jax.random.key(0), dict(image=jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32),
                                text=jax.ShapeDtypeStruct((1, 16), np.int32)), DEFAULT_RULES)
    step = make_train_step(method, tx, shardings)
    counted = flops.step_flops(step, abstract, batch)
    analytical = flops.dual_encoder_step_flops(model, b, 16)
    print(f"XLA {counted:.4g} analytical {analytical:.4g} ratio {counted / analytical:.3f}")
    assert 0.97 < counted / analytical < 1.10          # measured 1.018


class _Device:
    def __init__(self, kind, platform="gpu"):
        self.device_kind, self.platform = kind, platform


@pytest.mark.parametrize("kind,peak", [("TPU v4", 275e12), ("TPU v5 lite", 197e12),
                                       ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
                                       ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA H200", 989e12)])
def test_peak_table(kind, peak):
    assert flops.peak_flops_per_device(_Device(kind)) == peak


def test_cpu_peak_is_the_measured_matmul_rate_and_overridable():
    cpu = jax.devices()[0]
    measured = flops.measured_matmul_flops()
    assert measured > 1e8                                     # > 0.1 GFLOP/s: it ran
    assert flops.peak_flops_per_device(cpu) == measured
    assert flops.peak_flops_per_device(cpu, override=5e9) == 5e9
    assert flops.peak_flops_per_device(_Device("unknown accelerator")) == 0.0


def test_utilisation_formula():
    u = flops.utilisation(flops_per_step=8e12, steps_per_sec=2.0, batch_size=64, num_devices=8,
                          peak=4e12)
    assert u["tflops_per_device"] == pytest.approx(2.0)
    assert u["mfu"] == pytest.approx(0.5)
    assert u["samples_per_sec_per_device"] == pytest.approx(16.0)
    assert flops.utilisation(1e12, 1.0, 8, 1, 0.0)["mfu"] == 0.0
