"""FLOPs per train step, peak FLOP/s per device, and the utilisation figures of the log line.

    tflops_per_device = F_step / n_devices * steps_per_sec / 1e12
    mfu               = tflops_per_device * 1e12 / peak_flops_per_device
    samples_per_sec_per_device = global batch * steps_per_sec / n_devices

F_step, the FLOPs of one train step, is XLA's count of the lowered (unpartitioned, so global)
step program: every matmul, attention product, element-wise op, loss and optimizer update, for
any model family (`step_flops`). It needs a trace and a lowering, no compilation. For the
dual encoders the analytical count (`dual_encoder_step_flops`, below) agrees with it (tested),
as MaxText's per-model formulas do for language models.

Peak FLOP/s (`peak_flops_per_device`): vendor dense bf16 figures for accelerators (the table
below; float32 runs on them reach less), and on CPU the measured float32 matmul peak of one
device of this process (simulated CPU devices share the cores, so a mesh of several of them
shows the contention as a lower mfu). `train.peak_flops` overrides the table.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

# dense bf16 FLOP/s per chip, matched as a substring of `device.device_kind` (first match)
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


def step_flops(step_fn, *args) -> float:
    """FLOPs of one call of the jitted `step_fn(*args)`, from XLA's cost analysis of the
    lowered program (global: before partitioning over the mesh). 0.0 if unavailable."""
    try:
        cost = step_fn.lower(*args).cost_analysis()
    except Exception:     # a backend without cost analysis: no utilisation figures
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


@functools.lru_cache(maxsize=1)
def measured_matmul_flops(size: int = 1024, repeats: int = 3) -> float:
    """Best float32 [size, size] @ [size, size] FLOP/s of this process on its first device."""
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * size ** 3 / best


def peak_flops_per_device(device: Any = None, override: float | None = None) -> float:
    """Peak FLOP/s of one device (see the module docstring); 0.0 if unknown."""
    if override:
        return float(override)
    device = jax.devices()[0] if device is None else device
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops
    if device.platform == "cpu":
        return measured_matmul_flops()
    return 0.0


def utilisation(flops_per_step: float, steps_per_sec: float, batch_size: int,
                num_devices: int, peak: float) -> dict[str, float]:
    """The log line's tflops_per_device, mfu (0 when the peak is unknown) and
    samples_per_sec_per_device."""
    per_device = flops_per_step / num_devices * steps_per_sec
    return dict(tflops_per_device=per_device / 1e12,
                mfu=per_device / peak if peak else 0.0,
                samples_per_sec_per_device=batch_size * steps_per_sec / num_devices)


def _encoder_flops(tokens: int, width: int, depth: int, mlp: int) -> float:
    """Forward FLOPs of a pre-LN transformer over `tokens` tokens (one example):
    per layer 2T(4W^2 + 2WM) for the q, k, v, out and MLP matmuls + 4T^2 W for QK^T and AV."""
    return depth * (2.0 * tokens * (4 * width ** 2 + 2 * width * mlp) + 4.0 * tokens ** 2 * width)


def dual_encoder_step_flops(model_cfg, batch_size: int, text_length: int) -> float:
    """Analytical train-step FLOPs of a ViT + text-transformer dual encoder (CLIP):
    3 x forward (backward = 2 x forward) of the patch embedding, both towers, both projections
    and the B x B similarity matrix; element-wise ops and the optimizer are left out (XLA's
    count, `step_flops`, includes them)."""
    img, txt, d = model_cfg.image, model_cfg.text, model_cfg.embed_dim
    n = (img.image_size // img.patch_size) ** 2
    t_img = n + (img.get("pool", "cls") == "cls")
    patch = 2.0 * n * (img.patch_size ** 2 * 3) * img.width
    image = patch + _encoder_flops(t_img, img.width, img.depth, img.get("mlp_dim", 4 * img.width))
    text = _encoder_flops(text_length, txt.width, txt.depth, txt.get("mlp_dim", 4 * txt.width))
    proj = 2.0 * (img.width + txt.width) * d
    forward = batch_size * (image + text + proj) + 2.0 * batch_size ** 2 * d
    return 3.0 * forward
