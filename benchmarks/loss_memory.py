"""Per-device memory of the contrastive losses' forward + backward, from XLA's buffer assignment.

For each global batch G and each loss variant, the gradient of the loss with respect to both
towers' embeddings [G, D] (split over the devices) and the loss's scalars is jitted, lowered
with abstract inputs and compiled; nothing is executed, so 64k-row batches cost only compile
time. `compiled.memory_analysis()` gives per-device sizes of the arguments, the outputs and
the temporaries; their sum bounds the loss's peak. Variants:

    softmax          CLIP InfoNCE, all-gather of the other tower: n x G logits per device
    softmax-chunked  the same loss, log-sum-exp over column chunks with remat: n x c blocks
    sigmoid          SigLIP, all-gather form: n x G logits per device
    sigmoid-ring     SigLIP, texts passed around a ppermute ring: n x n blocks

    python benchmarks/loss_memory.py                      # 8 simulated CPU devices, D=512
    python benchmarks/loss_memory.py --batches 1024,4096 --dim 768 --chunk 512
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--batches", default="1024,4096,16384,65536", help="global batch sizes")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    p.add_argument("--chunk", type=int, default=1024, help="column chunk of the chunked softmax")
    p.add_argument("--variants", default="softmax,softmax-chunked,sigmoid,sigmoid-ring")
    return p.parse_args(argv)


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:   # devices must be set before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vlp_jax.losses.contrastive import (sigmoid_contrastive_loss,  # noqa: E402
                                        softmax_contrastive_loss)
from vlp_jax.losses.contrastive_blockwise import (  # noqa: E402
    chunked_softmax_contrastive_loss, ring_sigmoid_contrastive_loss)
from vlp_jax.parallel.mesh import batch_sharding, make_mesh, replicated  # noqa: E402
from vlp_jax.parallel.sharding import shard_batch_fn  # noqa: E402

MIB = 2 ** 20


def loss_fns(chunk: int) -> dict[str, tuple]:
    """name -> (loss_fn(u, v, *scalars, axis_name), number of scalars)."""
    return {
        "softmax": (softmax_contrastive_loss, 1),
        "softmax-chunked": (lambda u, v, t, axis_name: chunked_softmax_contrastive_loss(
            u, v, t, axis_name, chunk), 1),
        "sigmoid": (sigmoid_contrastive_loss, 2),
        "sigmoid-ring": (ring_sigmoid_contrastive_loss, 2),
    }


def compiled_memory(fn, num_scalars: int, mesh, global_batch: int, dim: int) -> dict:
    """Compiles grad of the sharded loss w.r.t. (u, v, scalars); returns per-device sizes."""
    sharded = shard_batch_fn(fn, mesh, 2, num_scalars)
    grad = jax.jit(jax.grad(lambda *a: sharded(*a)[0], argnums=tuple(range(2 + num_scalars))))
    emb = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated(mesh))
    t0 = time.perf_counter()
    stats = grad.lower(emb, emb, *([scalar] * num_scalars)).compile().memory_analysis()
    return dict(temp=stats.temp_size_in_bytes, argument=stats.argument_size_in_bytes,
                output=stats.output_size_in_bytes, compile_s=time.perf_counter() - t0)


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(args) -> None:
    mesh = make_mesh()
    devices = mesh.devices.size
    batches = [int(b) for b in args.batches.split(",")]
    names = args.variants.split(",")
    fns = loss_fns(args.chunk)
    unknown = set(names) - set(fns)
    if unknown:
        raise ValueError(f"--variants has unknown {sorted(unknown)}; valid: {sorted(fns)}")
    peak_rows, temp_rows = [], []
    for g in batches:
        n = g // devices
        peak, temp = [f"{g:,}", f"{n:,}", f"{n * g * 4 / MIB:,.1f}"], [f"{g:,}"]
        for name in names:
            fn, k = fns[name]
            m = compiled_memory(fn, k, mesh, g, args.dim)
            total = m["temp"] + m["argument"] + m["output"]
            peak.append(f"{total / MIB:,.1f}")
            temp.append(f"{m['temp'] / MIB:,.1f}")
            print(f"  G={g} {name}: temp {m['temp'] / MIB:.1f} MiB, args "
                  f"{m['argument'] / MIB:.1f}, out {m['output'] / MIB:.1f} "
                  f"(compiled in {m['compile_s']:.1f}s)", file=sys.stderr, flush=True)
        peak_rows.append(peak)
        temp_rows.append(temp)
    print(f"\nPer-device memory (MiB) of loss forward+backward: {devices} devices, D={args.dim}, "
          f"chunk={args.chunk}, float32; temp + argument + output from memory_analysis()\n")
    print(markdown(peak_rows, ["global batch", "rows/device", "one n x G logits"] + names))
    print("\nTemporaries only (MiB)\n")
    print(markdown(temp_rows, ["global batch"] + names))


if __name__ == "__main__":
    main(ARGS)
