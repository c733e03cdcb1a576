"""ViT-B/16 CLIP train-step throughput on one GPU: vlp_jax against open_clip (amp_bf16, SDPA).

(i)  vlp_jax: the shared jitted train step (`vlp_jax.train.step.make_train_step`: forward,
     backward, AdamW with global-norm clipping, non-finite guard, the TrainState donated) of
     the contrastive method on a ViT-B/16 CLIP: 224 px, patch 16, width 768, 12 layers, 12 heads;
     causal text transformer width 512, 12 layers, 8 heads, 77 tokens, vocabulary 49,408;
     embedding 512. `model.dtype='bfloat16'` (bf16 matmuls and activations, float32 parameters,
     optimizer state and loss), `model.attention_implementation='cudnn'` on GPU (cuDNN flash
     attention through `jax.nn.dot_product_attention`), `--remat` optional, layers scanned.
(ii) open_clip: `benchmarks/openclip_gpu_step.py` in `benchmarks/.venv-openclip` on the same
     device: `open_clip.create_model('ViT-B-16')`, `torch.autocast(bfloat16)` as open_clip's
     `--precision amp_bf16`, attention through SDPA. It runs first, in its own process, before
     JAX starts and preallocates the GPU's memory.

Both train on one synthetic batch kept on the device; compilation / warm-up excluded, the
median of `--repeats` runs of `--steps` steps reported. FLOPs per step are the analytical model
FLOPs of `vlp_jax.train.flops.dual_encoder_step_flops` (3 x forward; remat's recomputation not
counted, as MFU is defined), the same number for both frameworks; peak FLOP/s per device from
`vlp_jax.train.flops.peak_flops_per_device` (H100 / H200: 989 TFLOP/s dense bf16; on CPU the
measured float32 matmul peak). Printed: samples/s, TFLOP/s per device, MFU and the ratio
vlp_jax / open_clip. Goal on an H100-class GPU: ratio >= 1.3, MFU >= 40%.

    python benchmarks/gpu_clip.py                      # GPU: vlp_jax + open_clip, batch 256
    python benchmarks/gpu_clip.py --batch 512 --remat  # larger batch, blocks rematerialised
    python benchmarks/gpu_clip.py --no-open-clip       # vlp_jax only
    python benchmarks/gpu_clip.py --tiny               # CPU check in seconds (tiny widths)

The open_clip venv is made on first use by `train_throughput.py --with-open-clip` (or by hand:
`python -m venv benchmarks/.venv-openclip && benchmarks/.venv-openclip/bin/pip install
torch==2.14.1 torchvision==0.29.1 open_clip_torch`); this script does not install it and skips
the open_clip side, saying so, when it is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_PYTHON = os.path.join(HERE, ".venv-openclip", "bin", "python")
ATTENTION = ("auto", "cudnn", "xla")
# (image size, patch, width, layers, heads; text width, layers, heads, context, vocab; embed)
SIZES = {
    "b16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, text_width=512,
                text_layers=12, text_heads=8, context=77, vocab=49408, embed_dim=512),
    "tiny": dict(image_size=32, patch_size=8, width=64, layers=1, heads=2, text_width=64,
                 text_layers=1, text_heads=2, context=16, vocab=512, embed_dim=64),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="tiny widths, batch 8, 2 steps: checks the script on CPU in seconds")
    p.add_argument("--batch", type=int, default=0, help="batch per device (0: 256, tiny 8)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="model.dtype of vlp_jax (open_clip: amp_bf16 or fp32 to match)")
    p.add_argument("--attention", default="auto", choices=ATTENTION,
                   help="model.attention_implementation: auto = cudnn on GPU, xla elsewhere")
    p.add_argument("--remat", action="store_true", help="model.remat=True (each block)")
    p.add_argument("--remat-policy", default="nothing_saveable")
    p.add_argument("--no-scan", action="store_true", help="layers as a Python loop")
    p.add_argument("--warmup", type=int, default=0, help="0: 3 (tiny 1)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per repeat (0: 10, tiny 2)")
    p.add_argument("--repeats", type=int, default=0, help="0: 5 (tiny 1)")
    p.add_argument("--no-open-clip", action="store_true", help="vlp_jax only")
    p.add_argument("--torch-compile", action="store_true",
                   help="open_clip side with torch.compile (open_clip's --torchcompile)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or (8 if tiny else 256)
    args.warmup = args.warmup or (1 if tiny else 3)
    args.steps = args.steps or (2 if tiny else 10)
    args.repeats = args.repeats or (1 if tiny else 5)
    args.size = SIZES["tiny" if tiny else "b16"]
    return args


def attention_implementation(choice: str, platform: str) -> str | None:
    """model.attention_implementation for --attention on this platform: 'cudnn' needs a GPU
    (auto picks it there); elsewhere JAX's default (None = XLA)."""
    if choice == "cudnn" and platform != "gpu":
        raise ValueError(f"--attention cudnn needs a GPU; this JAX's default backend is "
                         f"{platform!r} (use --attention auto or xla)")
    if choice == "auto":
        return "cudnn" if platform == "gpu" else None
    return None if choice == "xla" else choice


def clip_config(args, implementation):
    """The experiment sections the contrastive method needs (open_clip's ViT-B-16 recipe
    optimiser: AdamW, betas 0.9 / 0.98, eps 1e-6, weight decay 0.1, clipping 1.0)."""
    import ml_collections
    s = args.size
    return ml_collections.ConfigDict(dict(
        model=dict(name="dual_encoder", embed_dim=s["embed_dim"], dtype=args.dtype,
                   remat=args.remat, remat_policy=args.remat_policy,
                   scan_layers=not args.no_scan, attention_implementation=implementation,
                   image=dict(type="vit", patch_size=s["patch_size"], width=s["width"],
                              depth=s["layers"], num_heads=s["heads"], mlp_dim=4 * s["width"],
                              image_size=s["image_size"], pool="cls"),
                   text=dict(width=s["text_width"], depth=s["text_layers"],
                             num_heads=s["text_heads"], mlp_dim=4 * s["text_width"],
                             context_length=s["context"], causal=True, pool="eot")),
        method=dict(name="contrastive", loss="softmax", mask_ratio=0.0),
        optim=dict(name="adamw", lr=1e-4, warmup_steps=10, b1=0.9, b2=0.98, eps=1e-6,
                   weight_decay=0.1, grad_clip_norm=1.0),
    ))


def synthetic_batch(batch: int, size: dict, seed: int = 0) -> dict:
    """image float32 [B, H, W, 3] in [-1, 1]; text int32 [B, L] `bos w... eos pad...`."""
    import numpy as np
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (batch, size["image_size"], size["image_size"], 3))
    text = np.zeros((batch, size["context"]), np.int32)
    for i, n in enumerate(rng.integers(2, size["context"] - 1, batch)):
        text[i, 0], text[i, n + 1] = 1, 2
        text[i, 1:n + 1] = rng.integers(3, size["vocab"], n)
    return dict(image=image.astype(np.float32), text=text)


def bench_vlp_jax(args) -> dict:
    """Times the donated train step on the first device; the JSON row of the table."""
    import jax
    from vlp_jax.methods.registry import build_method
    from vlp_jax.parallel.mesh import make_mesh, to_global_batch
    from vlp_jax.parallel.sharding import DEFAULT_RULES
    from vlp_jax.train.flops import dual_encoder_step_flops, peak_flops_per_device
    from vlp_jax.train.optim import make_optimizer
    from vlp_jax.train.step import init_state, make_train_step, state_shardings
    from benchmarks.train_throughput import time_steps

    device = jax.devices()[0]
    implementation = attention_implementation(args.attention, device.platform)
    cfg = clip_config(args, implementation)
    vocab = dict(vocab_size=args.size["vocab"], pad_id=0, bos_id=1, eos_id=2,
                 mask_id=args.size["vocab"] - 1)
    mesh = make_mesh(devices=[device])
    method = build_method(cfg, vocab, mesh)
    host_batch = synthetic_batch(args.batch, args.size)
    tx, _, shardings = state_shardings(method, lambda m: make_optimizer(cfg.optim, 1000, m),
                                       jax.random.key(0), host_batch, DEFAULT_RULES)
    state = init_state(method, tx, jax.random.key(0), host_batch, shardings)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    batch = to_global_batch(host_batch, mesh)
    t0 = time.perf_counter()
    try:
        step = make_train_step(method, tx, shardings).lower(state, batch).compile()
    except Exception as e:
        if implementation != "cudnn":
            raise
        raise RuntimeError("the train step with model.attention_implementation='cudnn' did not "
                           "compile (cuDNN supports a subset of shapes, dtypes and masks; see "
                           "help(jax.nn.dot_product_attention)); rerun with --attention xla to "
                           f"measure without it. The error: {e}") from e
    compile_s = time.perf_counter() - t0
    times, state, metrics = time_steps(step, state, batch, args.warmup, args.repeats,
                                       args.steps)
    step_s = statistics.median(times)
    memory = device.memory_stats() or {}
    return dict(framework="vlp_jax", jax=jax.__version__, device=device.device_kind,
                platform=device.platform, dtype=args.dtype,
                attention=implementation or "xla", remat=args.remat, scan=not args.no_scan,
                batch=args.batch, step_ms=1e3 * step_s, samples_per_sec=args.batch / step_s,
                repeats_ms=[1e3 * t for t in times], params=params, compile_s=compile_s,
                model_flops_per_step=dual_encoder_step_flops(cfg.model, args.batch,
                                                             args.size["context"]),
                peak_flops_per_device=peak_flops_per_device(device),
                peak_memory_gib=memory.get("peak_bytes_in_use", 0) / 2 ** 30 or None,
                final_loss=float(metrics["loss"]))


def openclip_flags(args) -> list[str]:
    s = args.size
    flags = ["--model=custom" if args.tiny else "--model=ViT-B-16",
             f"--precision={'amp_bf16' if args.dtype == 'bfloat16' else 'fp32'}",
             f"--batch={args.batch}", f"--warmup={args.warmup}", f"--steps={args.steps}",
             f"--repeats={args.repeats}"]
    flags += [f"--{k.replace('_', '-')}={v}" for k, v in s.items()]
    return flags + (["--torch-compile"] if args.torch_compile else [])


def bench_openclip(args) -> dict | None:
    """open_clip's row from `openclip_gpu_step.py` in the venv; None (said on stderr) if the
    venv is absent."""
    if not os.path.exists(VENV_PYTHON):
        print(f"open_clip side skipped: {VENV_PYTHON} does not exist (see the module docstring)",
              file=sys.stderr, flush=True)
        return None
    out = subprocess.run([VENV_PYTHON, os.path.join(HERE, "openclip_gpu_step.py"),
                          *openclip_flags(args)], capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"openclip_gpu_step.py failed (exit {out.returncode}):\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def utilisation_rows(results: list[dict], flops: float, peak: float) -> list[dict]:
    """Adds tflops_per_device and mfu (model FLOPs / step time / peak) to each result."""
    for r in results:
        r["tflops_per_device"] = flops / (r["step_ms"] / 1e3) / 1e12
        r["mfu"] = flops / (r["step_ms"] / 1e3) / peak if peak else 0.0
    return results


def table(results: list[dict]) -> str:
    header = ["implementation", "precision", "attention", "samples/s", "step ms",
              "TFLOP/s per device", "MFU", "params", "peak GiB"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for r in results:
        jax_side = r["framework"] == "vlp_jax"
        precision = (("bf16 compute, f32 params" if r["dtype"] == "bfloat16" else "float32")
                     + (", remat" if r.get("remat") else "")) if jax_side else r["precision"]
        attention = r["attention"] if jax_side else "SDPA" + (
            " (torch.compile)" if r.get("torch_compile") else "")
        name = (f"vlp_jax (JAX {r['jax']})" if jax_side
                else f"open_clip {r['open_clip']} (torch {r['torch'].split('+')[0]})")
        mem = r.get("peak_memory_gib")
        lines.append("| " + " | ".join([
            name, precision, attention, f"{r['samples_per_sec']:,.1f}", f"{r['step_ms']:.1f}",
            f"{r['tflops_per_device']:.3g}", f"{100 * r['mfu']:.1f}%",
            f"{r['params'] / 1e6:.1f} M", f"{mem:.1f}" if mem else "-"]) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(HERE))
    # open_clip first: once JAX has started it holds most of the GPU's memory (preallocation)
    other = None if args.no_open_clip else bench_openclip(args)
    if other is not None:
        print(json.dumps(other), file=sys.stderr, flush=True)
    results = [bench_vlp_jax(args)] + ([other] if other is not None else [])
    print(json.dumps(results[0]), file=sys.stderr, flush=True)
    jx = results[0]
    utilisation_rows(results, jx["model_flops_per_step"], jx["peak_flops_per_device"])
    s = args.size
    print(f"\nCLIP train step on one {jx['device']} ({jx['platform']}), batch {args.batch}: "
          f"ViT {s['image_size']}px/{s['patch_size']} width {s['width']} depth {s['layers']}; "
          f"text width {s['text_width']} depth {s['text_layers']} context {s['context']}; "
          f"embed {s['embed_dim']}; AdamW + clipping; median of {args.repeats} x {args.steps} "
          f"steps\n")
    print(table(results))
    print(f"\nModel FLOPs per step (analytical, both): {jx['model_flops_per_step'] / 1e9:,.4g} "
          f"GFLOP; peak per device {jx['peak_flops_per_device'] / 1e12:.3g} TFLOP/s")
    if len(results) == 2:
        ratio = jx["samples_per_sec"] / results[1]["samples_per_sec"]
        jx["ratio_to_open_clip"] = ratio
        print(f"vlp_jax / open_clip samples/s: {ratio:.2f} (goal on H100-class: >= 1.3; "
              f"MFU goal >= 40%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
