"""Whole-step memory per device against the global batch, and the step-time cost of the
memory-bounded contrastive losses, on simulated CPU devices.

(1) Memory (compile only). The shared jitted train step (`vlp_jax.train.step.make_train_step`:
    forward, backward, AdamW with clipping, non-finite guard) of a CLIP / SigLIP with tiny towers
    and a `--embed`-wide joint embedding is lowered for abstract inputs and compiled, never run,
    at a fixed per-device batch n (`--per-device`) on P = 8 .. 256 simulated devices, so the
    global batch G = n P grows from 8k to 256k. `compiled.memory_analysis()` gives one device's
    program: total = arguments + outputs - donated aliases + temporaries. Variants:

        clip-allgather    softmax InfoNCE, other tower all-gathered: n x G logits per device
        clip-chunked      `method.chunk_size`: the blockwise softmax (the texts passed around a
                          ppermute ring, n x c blocks, custom backward ring)
        siglip-allgather  sigmoid loss, all-gather form: n x G logits per device
        siglip-ring       `method.ring=True`: SigLIP's ppermute ring, n x n blocks

    The towers are tiny on purpose: what grows with G is the loss and its gathered embeddings,
    and a tiny tower keeps 256-device compiles to seconds. Each device count runs in its own
    process (the device count is fixed when jax is imported).

(2) Time (executed). On `--time-devices` (8) simulated devices, at per-device batches where
    every form fits, the loss alone (value and gradient w.r.t. both towers' embeddings and the
    scalars) and the whole train step are run; `--repeats` timed repeats of `--steps` calls
    after compilation and warm-up, each form and its all-gather form timed in turn within a
    repeat (the machine's load changes hit both alike), the median repeat reported, and the
    overhead of the chunked / ring form over its all-gather form in %.

    python benchmarks/scale_memory.py                          # both parts (20-40 min, 2 cores)
    python benchmarks/scale_memory.py --part memory --devices 8,32
    python benchmarks/scale_memory.py --part time --time-batches 128,512
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
MIB = 2 ** 20
# name -> (method.loss, method overrides); chunk size filled in from --chunk
VARIANTS = {
    "clip-allgather": ("softmax", {}),
    "clip-chunked": ("softmax", {"chunk_size": None}),
    "siglip-allgather": ("sigmoid", {}),
    "siglip-ring": ("sigmoid", {"ring": True}),
}
BASELINE = {"clip-chunked": "clip-allgather", "siglip-ring": "siglip-allgather"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="all", choices=("all", "memory", "time"))
    p.add_argument("--devices", default="8,32,128,256",
                   help="simulated device counts of the memory part")
    p.add_argument("--per-device", type=int, default=1024, help="per-device batch n (memory)")
    p.add_argument("--embed", type=int, default=512, help="joint embedding dim D")
    p.add_argument("--chunk", type=int, default=1024, help="method.chunk_size of clip-chunked")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--time-devices", type=int, default=8)
    p.add_argument("--time-batches", default="128,512",
                   help="per-device batches of the time part")
    p.add_argument("--steps", type=int, default=5, help="timed calls per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", default="", choices=("", "memory", "time"),
                   help=argparse.SUPPRESS)   # internal: one device count per process
    p.add_argument("--worker-devices", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants has unknown {sorted(unknown)}; valid: {list(VARIANTS)}")
    return args


def experiment_config(variant: str, embed: int, chunk: int):
    """Tiny towers (16 px / patch 8 ViT, width 32, 1 layer; text width 32, 1 layer, context 8),
    a `embed`-wide joint embedding, the variant's loss; AdamW with clipping."""
    import ml_collections
    loss, over = VARIANTS[variant]
    over = {k: (chunk if v is None else v) for k, v in over.items()}
    sigmoid = dict(logit_bias_init=-10.0, logit_scale_init=2.302585) if loss == "sigmoid" else {}
    return ml_collections.ConfigDict(dict(
        model=dict(name="dual_encoder", embed_dim=embed, dtype="float32", remat=False, **sigmoid,
                   image=dict(type="vit", patch_size=8, width=32, depth=1, num_heads=2,
                              mlp_dim=64, image_size=16, pool="cls"),
                   text=dict(width=32, depth=1, num_heads=2, mlp_dim=64, context_length=8,
                             causal=True, pool="eot")),
        method=dict(name="contrastive", loss=loss,
                    mask_ratio=0.0, **over),
        optim=dict(name="adamw", lr=1e-3, warmup_steps=10, weight_decay=0.1,
                   grad_clip_norm=1.0),
        mesh=dict(axes={"data": -1}),
    ))


VOCAB = dict(vocab_size=256, pad_id=0, bos_id=1, eos_id=2, mask_id=3)


def _setup(variant: str, args):
    """(method, tx, abstract state, shardings, mesh) of the variant's train step."""
    import jax
    import numpy as np
    from vlp_jax.methods.registry import build_method
    from vlp_jax.parallel.mesh import make_mesh
    from vlp_jax.parallel.sharding import logical_rules
    from vlp_jax.train.optim import make_optimizer
    from vlp_jax.train.step import state_shardings
    cfg = experiment_config(variant, args.embed, args.chunk)
    mesh = make_mesh(cfg.mesh)
    method = build_method(cfg, VOCAB, mesh)
    example = dict(image=np.zeros((1, 16, 16, 3), np.float32), text=np.zeros((1, 8), np.int32))
    tx, abstract, shardings = state_shardings(
        method, lambda mask: make_optimizer(cfg.optim, 1000, mask), jax.random.key(0), example,
        logical_rules(cfg.mesh))
    return method, tx, abstract, shardings, mesh


def _abstract_batch(mesh, global_batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    from vlp_jax.parallel.mesh import batch_sharding
    sh = batch_sharding(mesh)
    return dict(image=jax.ShapeDtypeStruct((global_batch, 16, 16, 3), jnp.float32, sharding=sh),
                text=jax.ShapeDtypeStruct((global_batch, 8), jnp.int32, sharding=sh))


def memory_worker(args) -> list[dict]:
    """Compiles every variant's train step at G = n * devices; per-device byte counts."""
    import jax
    from vlp_jax.train.checkpoint import abstract_with_shardings
    from vlp_jax.train.step import make_train_step
    rows = []
    devices = jax.device_count()
    for variant in args.variants.split(","):
        method, tx, abstract, shardings, mesh = _setup(variant, args)
        t0 = time.perf_counter()
        compiled = make_train_step(method, tx, shardings).lower(
            abstract_with_shardings(abstract, shardings),
            _abstract_batch(mesh, args.per_device * devices)).compile()
        s = compiled.memory_analysis()
        rows.append(dict(variant=variant, devices=devices, n=args.per_device,
                         global_batch=args.per_device * devices,
                         argument=s.argument_size_in_bytes, output=s.output_size_in_bytes,
                         alias=s.alias_size_in_bytes, temp=s.temp_size_in_bytes,
                         total=s.argument_size_in_bytes + s.output_size_in_bytes
                         - s.alias_size_in_bytes + s.temp_size_in_bytes,
                         compile_s=time.perf_counter() - t0))
        print(f"  P={devices} {variant}: total {rows[-1]['total'] / MIB:,.1f} MiB "
              f"(compiled in {rows[-1]['compile_s']:.1f}s)", file=sys.stderr, flush=True)
    return rows


def _interleaved(fns: list, args) -> list[list[float]]:
    """Seconds per call of each blocking fn(), per repeat, the fns timed in turn within every
    repeat (so a change of the machine's load hits all of them alike), after 2 warm-up calls."""
    for fn in fns:
        for _ in range(2):
            fn()
    times = [[] for _ in fns]
    for _ in range(args.repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            t.append((time.perf_counter() - t0) / args.steps)
    return times


def _variant_fns(variant: str, n: int, host: dict, args) -> tuple:
    """(loss_fn, step_fn): blocking calls of the loss's value and gradient w.r.t. both [G, D]
    embeddings and its scalars, and of the whole (donated) train step."""
    import jax
    import jax.numpy as jnp
    from vlp_jax.parallel.mesh import to_global_batch
    from vlp_jax.train.step import init_state, make_train_step
    method, tx, _, shardings, mesh = _setup(variant, args)
    g = host["text"].shape[0]
    objective = method._itc   # the method's contrastive objective (its sharded loss)
    emb = jax.device_put(jax.random.normal(jax.random.key(1), (2, g, args.embed), jnp.float32),
                         jax.sharding.NamedSharding(mesh, jax.P(None, "data")))
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    scalars = (jnp.log(10.0),) if VARIANTS[variant][0] == "softmax" else \
        (jnp.log(10.0), jnp.array(-10.0))
    loss_grad = jax.jit(jax.value_and_grad(
        lambda e, s: objective.loss_of((e[0], e[1]), s)[0], argnums=(0, 1)))
    holder = [init_state(method, tx, jax.random.key(0), host, shardings)]
    batch = to_global_batch(host, mesh)
    step = make_train_step(method, tx, shardings)

    def run_step():
        holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready(metrics)
    return (lambda: jax.block_until_ready(loss_grad(emb, scalars))), run_step


def time_worker(args) -> list[dict]:
    """Executes the loss (value and grad) and the whole train step of each ring / chunked form
    and its all-gather form, interleaved (`_interleaved`)."""
    import jax
    import numpy as np
    rows = []
    devices = jax.device_count()
    variants = args.variants.split(",")
    pairs = [(BASELINE[v], v) for v in variants if v in BASELINE and BASELINE[v] in variants]
    for n in [int(b) for b in args.time_batches.split(",")]:
        g = n * devices
        rng = np.random.default_rng(0)
        text = np.zeros((g, 8), np.int32)
        text[:, 0], text[:, 1:6], text[:, 6] = 1, rng.integers(4, 256, (g, 5)), 2
        host = dict(image=rng.uniform(-1, 1, (g, 16, 16, 3)).astype(np.float32), text=text)
        for pair in pairs:
            fns = [_variant_fns(v, n, host, args) for v in pair]
            loss_s = _interleaved([f[0] for f in fns], args)
            step_s = _interleaved([f[1] for f in fns], args)
            for v, ls, ss in zip(pair, loss_s, step_s):
                rows.append(dict(variant=v, devices=devices, n=n, global_batch=g,
                                 loss_ms=1e3 * statistics.median(ls),
                                 step_ms=1e3 * statistics.median(ss),
                                 loss_repeats_ms=[1e3 * t for t in ls],
                                 step_repeats_ms=[1e3 * t for t in ss]))
                print(f"  n={n} {v}: loss {rows[-1]['loss_ms']:.1f} ms "
                      f"{[round(1e3 * t) for t in ls]}, step {rows[-1]['step_ms']:.1f} ms "
                      f"{[round(1e3 * t) for t in ss]}", file=sys.stderr, flush=True)
    return rows


def run_worker(kind: str, devices: int, args) -> list[dict]:
    """Runs this script as `--worker kind` on `devices` simulated CPU devices; its rows."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={devices}"))
    argv = [a for a in sys.argv[1:] if not a.startswith("--worker")]
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--worker={kind}",
                          f"--worker-devices={devices}"], env=env, stdout=subprocess.PIPE,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"the {kind} worker on {devices} devices failed "
                           f"(exit {out.returncode}); its stderr is above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def memory_table(rows: list[dict], variants: list[str], embed: int) -> str:
    by = {(r["devices"], r["variant"]): r for r in rows}
    out = []
    for p in sorted({r["devices"] for r in rows}):
        r0 = next(r for r in rows if r["devices"] == p)
        n, g = r0["n"], r0["global_batch"]
        out.append([f"{g:,}", str(p), f"{n * g * 4 / MIB:,.0f}", f"{g * embed * 4 / MIB:,.0f}"]
                   + [f"{by[(p, v)]['total'] / MIB:,.0f}" if (p, v) in by else "-"
                      for v in variants])
    return markdown(["global batch", "devices", "one n x G logits", "one G x D embedding"]
                    + variants, out)


def time_table(rows: list[dict]) -> str:
    by = {(r["n"], r["variant"]): r for r in rows}
    out = []
    for (n, v), r in sorted(by.items()):
        if v not in BASELINE or (n, BASELINE[v]) not in by:
            continue
        b = by[(n, BASELINE[v])]
        out.append([f"{r['global_batch']:,}", str(n), f"{v} vs {BASELINE[v]}",
                    f"{r['loss_ms']:.1f}", f"{b['loss_ms']:.1f}",
                    f"{100 * (r['loss_ms'] / b['loss_ms'] - 1):+.1f}%",
                    f"{r['step_ms']:.1f}", f"{b['step_ms']:.1f}",
                    f"{100 * (r['step_ms'] / b['step_ms'] - 1):+.1f}%"])
    return markdown(["global batch", "rows/device", "form", "loss ms", "all-gather loss ms",
                     "loss overhead", "step ms", "all-gather step ms", "step overhead"], out)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, os.path.dirname(HERE))
        rows = memory_worker(args) if args.worker == "memory" else time_worker(args)
        print(json.dumps(rows))
        return
    variants = args.variants.split(",")
    if args.part in ("all", "memory"):
        rows = []
        for p in [int(d) for d in args.devices.split(",")]:
            rows += run_worker("memory", p, args)
        print(f"\nWhole train step, per-device MiB (arguments + outputs - donated + temporaries, "
              f"memory_analysis, compile only): tiny towers, D = {args.embed}, "
              f"{args.per_device} rows per device, chunk {args.chunk}, AdamW, float32\n")
        print(memory_table(rows, variants, args.embed))
    if args.part in ("all", "time"):
        rows = run_worker("time", args.time_devices, args)
        print(f"\nStep time on {args.time_devices} simulated CPU devices (executed; median of "
              f"{args.repeats} repeats of {args.steps} calls, each pair interleaved): the "
              f"loss's value and gradient w.r.t. both [G, {args.embed}] embeddings and its "
              f"scalars, and the whole train step of the tiny model, chunk {args.chunk}\n")
        print(time_table(rows))


if __name__ == "__main__":
    main()
