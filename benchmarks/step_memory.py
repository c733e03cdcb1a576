"""Per-device memory of the whole CLIP train step under each layout and memory option.

The shared train step (`vlp_jax.train.step`) of a CLIP with ViT-B/16 widths (224 px, patch 16,
width 768, 12 heads; text width 512, context 77, vocab 32k; `--depth` layers per tower, 2 by
default because XLA:CPU needs minutes per variant to compile all 12) is compiled, never run,
on simulated CPU devices for several `config.mesh.axes` layouts and for remat, bfloat16 and
GradCache; `compiled.memory_analysis()` gives per-device sizes:

    state      the arguments: TrainState (params + AdamW moments) and the batch shard
    temp       activations, gradients and other temporaries XLA allocates during the step
    total      arguments + outputs - donated (aliased) outputs + temporaries

    python benchmarks/step_memory.py                   # B/16 widths, depth 2, batch 256, 8 devices
    python benchmarks/step_memory.py --model tiny      # a quick check of the script

XLA:CPU's buffer assignment shows no saving from remat or bfloat16 in this JAX, although the
recomputed matmuls are present in the compiled step: measure those two on the accelerator,
e.g. `JAX_PLATFORMS=cuda python benchmarks/step_memory.py --devices 1 --batch 32`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--model", default="b16", choices=("b16", "tiny"))
    p.add_argument("--depth", type=int, default=0,
                   help="layers per tower (0 = the model's default, 2)")
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--variants", default="all",
                   help="comma-separated names from the VARIANTS table, or 'all'")
    return p.parse_args(argv)


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:   # devices must be set before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from vlp_jax.methods.registry import build_method  # noqa: E402
from vlp_jax.parallel.mesh import batch_sharding, make_mesh  # noqa: E402
from vlp_jax.parallel.sharding import logical_rules  # noqa: E402
from vlp_jax.train.checkpoint import abstract_with_shardings  # noqa: E402
from vlp_jax.train.optim import make_optimizer  # noqa: E402
from vlp_jax.train.step import make_train_step, state_shardings  # noqa: E402

MIB = 2 ** 20
MODELS = {   # (image: size, patch, width, depth, heads; text: width, depth, heads, context, vocab)
    "b16": dict(image=(224, 16, 768, 2, 12), text=(512, 2, 8, 77, 32000), embed=512),
    "tiny": dict(image=(32, 4, 64, 2, 2), text=(64, 2, 2, 16, 1000), embed=64),
}
# name -> (mesh axes, model overrides, method overrides)
VARIANTS = {
    "data": ({"data": -1}, {}, {}),
    "fsdp": ({"fsdp": -1}, {}, {}),
    "data2-fsdp4": ({"data": 2, "fsdp": -1}, {}, {}),
    "data4-model2": ({"data": -1, "model": 2}, {}, {}),
    "data+remat": ({"data": -1}, {"remat": True}, {}),
    "data+bf16": ({"data": -1}, {"dtype": "bfloat16"}, {}),
    "data+gradcache4": ({"data": -1}, {}, {"accumulation": "grad_cache", "micro_batches": 4}),
    "fsdp+gradcache4": ({"fsdp": -1}, {}, {"accumulation": "grad_cache", "micro_batches": 4}),
}


def experiment_config(model: str, axes: dict, model_over: dict, method_over: dict,
                      layers: int = 0):
    m = MODELS[model]
    size, patch, width, depth, heads = m["image"]
    t_width, t_depth, t_heads, context, _ = m["text"]
    depth, t_depth = (layers, layers) if layers else (depth, t_depth)
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(dict(
        name="dual_encoder", embed_dim=m["embed"], dtype="float32", remat=False,
        image=dict(type="vit", patch_size=patch, width=width, depth=depth, num_heads=heads,
                   mlp_dim=4 * width, image_size=size, pool="cls"),
        text=dict(width=t_width, depth=t_depth, num_heads=t_heads, mlp_dim=4 * t_width,
                  context_length=context, causal=True, pool="eot")))
    cfg.model.update(model_over)
    cfg.method = ml_collections.ConfigDict(dict(name="contrastive", loss="softmax",
                                                mask_ratio=0.0, **method_over))
    cfg.optim = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, warmup_steps=10))
    cfg.mesh = ml_collections.ConfigDict(dict(axes=axes))
    return cfg


def step_memory(cfg, model: str, global_batch: int) -> dict:
    """Compiles the train step for abstract inputs; returns per-device byte counts."""
    size, context, vocab_size = MODELS[model]["image"][0], MODELS[model]["text"][3], \
        MODELS[model]["text"][4]
    vocab = dict(vocab_size=vocab_size, pad_id=0, bos_id=1, eos_id=2, mask_id=3)
    mesh = make_mesh(cfg.mesh)
    method = build_method(cfg, vocab, mesh)
    example = dict(image=np.zeros((1, size, size, 3), np.float32),   # shapes for init only
                   text=np.zeros((1, context), np.int32))
    tx, abstract, shardings = state_shardings(
        method, lambda mask: make_optimizer(cfg.optim, 1000, mask), jax.random.key(0), example,
        logical_rules(cfg.mesh))
    batch = dict(image=jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32),
                 text=jax.ShapeDtypeStruct((global_batch, context), jnp.int32))
    sharded_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh))
                     for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = make_train_step(method, tx, shardings).lower(
        abstract_with_shardings(abstract, shardings), sharded_batch).compile()
    stats = compiled.memory_analysis()
    params = sum(x.size for x in jax.tree.leaves(abstract.params))
    return dict(params=params, argument=stats.argument_size_in_bytes,
                output=stats.output_size_in_bytes, alias=stats.alias_size_in_bytes,
                temp=stats.temp_size_in_bytes, compile_s=time.perf_counter() - t0,
                mesh=dict(mesh.shape))


def main(args) -> None:
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise ValueError(f"--variants has unknown {sorted(unknown)}; valid: {list(VARIANTS)}")
    rows, params = [], 0
    for name in names:
        axes, model_over, method_over = VARIANTS[name]
        m = step_memory(experiment_config(args.model, axes, model_over, method_over,
                                          args.depth), args.model, args.batch)
        params = m["params"]
        total = m["argument"] + m["output"] - m["alias"] + m["temp"]
        mesh = "x".join(f"{k}{v}" for k, v in m["mesh"].items() if v > 1)
        rows.append([name, mesh, f"{m['argument'] / MIB:,.0f}", f"{m['temp'] / MIB:,.0f}",
                     f"{total / MIB:,.0f}"])
        print(f"  {name}: compiled in {m['compile_s']:.0f}s", file=sys.stderr, flush=True)
    depth = args.depth or MODELS[args.model]["image"][3]
    print(f"\nTrain step memory per device (MiB): {args.model} CLIP, {depth} layers per tower "
          f"({params / 1e6:.1f} M params), global batch {args.batch}, {args.devices} devices, "
          f"AdamW, float32 params, from memory_analysis()\n")
    header = ["variant", "mesh", "state + batch", "temp", "total"]
    print("| " + " | ".join(header) + " |\n|---|---|---:|---:|---:|")
    print("\n".join("| " + " | ".join(r) + " |" for r in rows))


if __name__ == "__main__":
    main(ARGS)
