"""One process of the multi-host test (`tests/test_multihost.py`); also the 1-process reference.

Run from the repository root as a separate Python process:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    VLP_JAX_COORDINATOR=127.0.0.1:PORT VLP_JAX_NUM_PROCESSES=2 VLP_JAX_PROCESS_ID=i \
    python tests/multihost_worker.py --out result_i.json --workdir SHARED_TMP

Without the VLP_JAX_* variables it runs as one process over its local devices. Either way,
for each of `--losses` (CLIP's all-gather softmax, SigLIP's ppermute ring) it builds a tiny
dual encoder through the method registry, a mesh over every global device (`config.mesh.axes`,
default all on `fsdp`, so parameters are split across processes), and trains `--steps` steps
with the shared train step on a deterministic synthetic global batch of which this process
feeds only its own rows (`to_global_batch`). For the first loss, after `--save-at` steps every
process saves an orbax checkpoint in the shared workdir, restores it, checks the restored
arrays equal the saved ones, and continues training from the restored state. The JSON written
to `--out` holds, per loss, the loss trajectory, a checksum of the assembled global batch and
the checkpoint checks; with `--webdataset`, the webdataset stream's resume checks
(`webdataset_resume`).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB = {"vocab_size": 64, "pad_id": 0}
IMAGE, TEXT = 16, 8


def configure_jax():
    """Cross-process CPU collectives need gloo; then jax.distributed from the VLP_JAX_* vars."""
    import jax
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from vlp_jax.parallel.distributed import maybe_initialize_distributed
    return maybe_initialize_distributed()


def tiny_config(axes: dict, loss: str):
    import ml_collections
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(dict(
        name="dual_encoder", embed_dim=16,
        image=dict(type="vit", patch_size=4, width=32, depth=1, num_heads=2, image_size=IMAGE),
        text=dict(width=32, depth=1, num_heads=2, context_length=TEXT, causal=True)))
    if loss == "sigmoid":
        cfg.model.logit_scale_init = float(np.log(10.0))
        cfg.model.logit_bias_init = -10.0
    cfg.method = ml_collections.ConfigDict(dict(name="contrastive", loss=loss, mask_ratio=0.0,
                                                ring=loss == "sigmoid"))
    cfg.optim = ml_collections.ConfigDict(dict(lr=3e-3, warmup_steps=2, weight_decay=0.0))
    cfg.mesh = ml_collections.ConfigDict(dict(axes=axes))
    return cfg


def global_batch(step: int, size: int) -> dict[str, np.ndarray]:
    """The full synthetic batch of `step`: identical in every process, a function of step only."""
    rng = np.random.default_rng(1000 + step)
    image = rng.uniform(-1, 1, (size, IMAGE, IMAGE, 3)).astype(np.float32)
    text = np.zeros((size, TEXT), np.int32)
    length = rng.integers(2, TEXT - 1, size)
    for i, n in enumerate(length):
        text[i, 0], text[i, n + 1] = 2, 3
        text[i, 1:n + 1] = rng.integers(5, VOCAB["vocab_size"], n)
    return dict(image=image, text=text)


def local_rows(batch: dict, process: int, count: int) -> dict[str, np.ndarray]:
    """This process's contiguous slice of the global batch (process p feeds rows p*B/P ...)."""
    size = next(iter(batch.values())).shape[0] // count
    return {k: v[process * size:(process + 1) * size] for k, v in batch.items()}


def row_weighted_checksum(batch: dict[str, np.ndarray]) -> float:
    """sum_i (i + 1) * (mean(image_i) + mean(text_i)): detects rows placed in the wrong order."""
    w = np.arange(1, batch["image"].shape[0] + 1, dtype=np.float64)
    per_row = batch["image"].reshape(len(w), -1).mean(1) + batch["text"].mean(1)
    return float(np.sum(w * per_row))


@functools.cache
def _jitted_checksum():
    import jax
    import jax.numpy as jnp

    def checksum(b):
        w = jnp.arange(1, b["image"].shape[0] + 1, dtype=jnp.float32)
        return jnp.sum(w * (b["image"].reshape(w.shape[0], -1).mean(1)
                            + b["text"].astype(jnp.float32).mean(1)))
    return jax.jit(checksum)


def global_checksum(batch) -> float:
    """`row_weighted_checksum` of an assembled global batch (jax.Arrays on the mesh), computed
    on the devices: every process gets the same replicated value."""
    return float(_jitted_checksum()({k: batch[k] for k in ("image", "text")}))


def webdataset_config(pattern: str, cache: str):
    """The data section of the webdataset resume check (the test trains its tokenizer with it
    before the processes start, so they only read the cache)."""
    from vlp_jax.config_schema import resolve_part
    return resolve_part("data", dict(name="webdataset", train_path=pattern, data_dir=cache,
                                     image_size=IMAGE, text_length=TEXT, vocab_size=128,
                                     read_threads=0, shuffle_buffer=8))


def _local_shards(tree) -> list[np.ndarray]:
    import jax
    return [np.asarray(s.data) for x in jax.tree.leaves(tree) for s in x.addressable_shards]


def run(args, loss: str, checkpoint: bool) -> dict:
    import jax

    from vlp_jax.methods.registry import build_method
    from vlp_jax.parallel.mesh import make_mesh, to_global_batch
    from vlp_jax.parallel.sharding import logical_rules
    from vlp_jax.train.checkpoint import abstract_with_shardings
    from vlp_jax.train.optim import make_optimizer
    from vlp_jax.train.step import init_state, make_train_step, state_shardings

    pid, count = jax.process_index(), jax.process_count()
    cfg = tiny_config(json.loads(args.axes), loss)
    mesh = make_mesh(cfg.mesh)
    method = build_method(cfg, VOCAB, mesh)
    example = local_rows(global_batch(0, args.batch), 0, 1)
    tx, abstract, shardings = state_shardings(
        method, lambda m: make_optimizer(cfg.optim, args.steps, m), jax.random.key(0), example,
        logical_rules(cfg.mesh))
    state = init_state(method, tx, jax.random.key(0), example, shardings)
    step_fn = make_train_step(method, tx, shardings)

    out = dict(process_index=pid, process_count=count, device_count=jax.device_count(),
               local_device_count=jax.local_device_count(), losses=[], checksums=[],
               expected_checksums=[], mesh=dict(mesh.shape))
    for step in range(1, args.steps + 1):
        full = global_batch(step, args.batch)
        batch = to_global_batch(local_rows(full, pid, count), mesh)
        out["checksums"].append(global_checksum(batch))
        out["expected_checksums"].append(row_weighted_checksum(full))
        state, metrics = step_fn(state, batch)
        out["losses"].append(float(metrics["loss"]))
        if checkpoint and step == args.save_at:
            state, out["checkpoint"] = save_and_restore(
                state, step, args.workdir, abstract_with_shardings(abstract, shardings))
    return out


def save_and_restore(state, step: int, workdir: str, target):
    """Every process saves `state`, then restores it from disk; returns (restored, checks)."""
    import jax
    from vlp_jax.train.checkpoint import Checkpointer
    saved = _local_shards(state)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, every=1)
    ckpt.save(step, state, {"position": step}, force=True)
    ckpt.close()
    del state                                   # continue only from what was read back
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, every=1)
    restored, data_state = ckpt.restore(target)
    ckpt.close()
    loaded = _local_shards(restored)
    equal = len(saved) == len(loaded) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(saved, loaded))
    split = [x.sharding.is_fully_addressable for x in jax.tree.leaves(restored.params)]
    return restored, dict(step=int(restored.step), data_state=data_state, arrays_equal=equal,
                          num_local_shards=len(loaded),
                          params_spanning_processes=int(sum(not s for s in split)))


def webdataset_resume(args) -> dict:
    """Exact mid-shard resume of this process's webdataset stream (`--webdataset`): 2 batches
    taken (mid-shard, buffer full), the position saved, 4 more batches (into the next shard)
    against 4 from a fresh iterator restored to the position; each batch also assembled into
    the global array on the mesh, whose `global_checksum` every process computes."""
    from vlp_jax.parallel.mesh import make_mesh, to_global_batch
    from vlp_jax.train.data_bridge import DataBridge
    cfg = webdataset_config(args.webdataset, args.wds_cache)
    bridge, mesh = DataBridge(cfg), make_mesh()
    it = bridge.train_iterator(global_batch_size=args.batch // 4, seed=3)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = bridge.train_iterator(global_batch_size=args.batch // 4, seed=3)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(4)]
    glob = lambda b: global_checksum(to_global_batch(b, mesh))
    return dict(
        local_equal=all(np.array_equal(a[k], b[k]) for a, b in zip(expected, got) for k in a),
        shard=state["grain"]["shard"], buffered=len(state["grain"]["buffer"]),
        expected=[glob(b) for b in expected], resumed=[glob(b) for b in got],
        first_texts=bridge.detokenize(expected[0]["text"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True, help="shared by every process")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-at", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--losses", default="softmax,sigmoid",
                        help="comma-separated; 'softmax' = CLIP (all-gather), 'sigmoid' = "
                             "SigLIP ring (ppermute); the first also checkpoints")
    parser.add_argument("--axes", default='{"fsdp": -1}', help="config.mesh.axes as JSON")
    parser.add_argument("--webdataset", default=None,
                        help="a shard pattern: also check exact resume of the webdataset stream")
    parser.add_argument("--wds-cache", default=None, help="its data_dir (tokenizer cache)")
    args = parser.parse_args(argv)
    distributed = configure_jax()
    result = {loss: run(args, loss, checkpoint=i == 0)
              for i, loss in enumerate(args.losses.split(","))}
    if args.webdataset:
        result["webdataset"] = webdataset_resume(args)
    result["distributed"] = distributed
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    import jax
    if distributed:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
