"""CLIP train-step throughput on one CPU device: vlp_jax against open_clip (PyTorch).

(i)   vlp_jax: the shared jitted train step (`vlp_jax.train.step`) of the contrastive method on
      a tiny ViT + causal text transformer, one synthetic batch kept on device; compilation and
      warm-up steps excluded, `--repeats` runs of `--steps` steps timed; the best and the median
      repeat are reported (the best is the one least disturbed by other jobs on a shared machine).
      The repeats of every row (vlp_jax's, and open_clip's with `--with-open-clip`) are
      interleaved, one repeat of each row in turn, so that a change of load on a shared machine
      falls on both frameworks alike.
(ii)  model FLOPs per step from XLA (`compiled.cost_analysis()['flops']`), the achieved FLOP/s
      and their ratio to this process's measured large-matmul FLOP/s (the practical peak).
(iii) with `--with-open-clip`: the same model and batch in open_clip, run by
      `benchmarks/openclip_step.py` inside `benchmarks/.venv-openclip` (created on first use:
      torch 2.14.1 + torchvision 0.29.1 + open_clip_torch, ~5.6 GB, several minutes).

Two model configs (`--config`, default both): `bench` (ViT 32 px / patch 4, width 128, depth 4
per tower, text context 16, batch 64) and `main`, shaped like the main job
(experiments/clip_shapes.py: 64 px / patch 8, width 96, depth 3, 4 heads, text context 28,
vocab 256, embed 96, batch 128). A size flag overrides the preset of every config run.
For each config with `--with-open-clip` the line `vlp_jax / open_clip samples/s: R` is printed.
`--devices 1 2` adds a vlp_jax row with the same global batch split over 2 CPU devices
(data parallel on the same cores; its own ratio line).

    python benchmarks/train_throughput.py                  # vlp_jax only
    python benchmarks/train_throughput.py --with-open-clip # both, and their ratio
    python benchmarks/train_throughput.py --with-open-clip --config main
    python benchmarks/train_throughput.py --with-open-clip --devices 1 2
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
VENV = os.path.join(HERE, ".venv-openclip")
# webdataset (<= 0.2.86 as open_clip_train requires: 1.0 renamed the tar samples' keys), pandas
# and braceexpand: what open_clip_train.data imports (data_throughput.py's open_clip side)
OPENCLIP_PACKAGES = ("torch==2.14.1", "torchvision==0.29.1", "open_clip_torch", "webdataset==0.2.86",
                     "pandas", "braceexpand")
# Flags shared by this script and openclip_step.py (name, default = the `bench` config).
MODEL_FLAGS = (("image-size", 32), ("patch-size", 4), ("width", 128), ("layers", 4),
               ("heads", 4), ("text-width", 128), ("text-layers", 4), ("text-heads", 4),
               ("context", 16), ("vocab", 1024), ("embed-dim", 128), ("batch", 64))
# The model configs: `bench` (MODEL_FLAGS' defaults) and `main`, the main job's shapes
# (experiments/clip_shapes.py with its shapes data: 64 px, 8 x 8 patches, text_length 28).
CONFIGS = {
    "bench": dict(MODEL_FLAGS),
    "main": dict(MODEL_FLAGS, **{"image-size": 64, "patch-size": 8, "width": 96, "layers": 3,
                                 "text-width": 96, "text-layers": 3, "context": 28,
                                 "vocab": 256, "embed-dim": 96, "batch": 128}),
}


def _attr(name: str) -> str:
    return name.replace("-", "_")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=(*CONFIGS, "both"), default="both",
                   help="model config(s) to run (default: both)")
    for name, default in MODEL_FLAGS:
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"override the config's value (bench: {default}, "
                            f"main: {CONFIGS['main'][name]})")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (best and median reported)")
    p.add_argument("--devices", type=int, nargs="+", default=[1],
                   help="vlp_jax rows: CPU devices (jax_num_cpu_devices) the batch is split over, "
                        "data parallel on the same cores; 1 (default) = the one-device row")
    p.add_argument("--with-open-clip", action="store_true",
                   help=f"also run open_clip in {VENV} (created if absent)")
    return p.parse_args(argv)


def config_args(args, name: str) -> argparse.Namespace:
    """`args` with the sizes of config `name` filled in where no size flag was given."""
    if name not in CONFIGS:
        raise ValueError(f"unknown benchmark config {name!r}; valid: {sorted(CONFIGS)}")
    out = argparse.Namespace(**vars(args))
    out.config = name
    for flag, value in CONFIGS[name].items():
        if getattr(args, _attr(flag)) is None:
            setattr(out, _attr(flag), value)
    return out


def clip_config(args):
    """The experiment sections the contrastive method needs, for the benchmark's model."""
    import ml_collections
    return ml_collections.ConfigDict(dict(
        model=dict(name="dual_encoder", embed_dim=args.embed_dim, dtype="float32", remat=False,
                   image=dict(type="vit", patch_size=args.patch_size, width=args.width,
                              depth=args.layers, num_heads=args.heads, mlp_dim=4 * args.width,
                              image_size=args.image_size, pool="cls"),
                   text=dict(width=args.text_width, depth=args.text_layers,
                             num_heads=args.text_heads, mlp_dim=4 * args.text_width,
                             context_length=args.context, causal=True, pool="eot")),
        method=dict(name="contrastive", loss="softmax", mask_ratio=0.0),
        optim=dict(name="adamw", lr=1e-3, warmup_steps=10, b1=0.9, b2=0.98, eps=1e-6,
                   weight_decay=0.1, grad_clip_norm=1.0),
    ))


def synthetic_batch(args, seed: int = 0) -> dict:
    """image float32 [B, H, W, 3] in [-1, 1]; text int32 [B, L] `bos w... eos pad...`."""
    import numpy as np
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (args.batch, args.image_size, args.image_size, 3))
    text = np.zeros((args.batch, args.context), np.int32)
    for i, n in enumerate(rng.integers(2, args.context - 1, args.batch)):
        text[i, 0], text[i, n + 1] = 1, 2
        text[i, 1:n + 1] = rng.integers(3, args.vocab, n)
    return dict(image=image.astype(np.float32), text=text)


def matmul_flops_per_sec(n: int = 2048, reps: int = 5) -> float:
    """Best-of-`reps` FLOP/s of one jitted float32 n x n x n matmul on the default device."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # older JAX: one dict per computation
        cost = cost[0]
    return float(cost["flops"])


class VlpJaxRow:
    """One vlp_jax row: the global batch split over `devices` CPU devices (1: one device),
    compiled and warmed up at construction; `repeat()` times `args.steps` steps."""

    def __init__(self, args, devices: int = 1):
        import jax
        from vlp_jax.methods.registry import build_method
        from vlp_jax.parallel.mesh import make_mesh, to_global_batch
        from vlp_jax.parallel.sharding import DEFAULT_RULES
        from vlp_jax.train.optim import make_optimizer
        from vlp_jax.train.step import init_state, make_train_step, state_shardings

        cfg = clip_config(args)
        vocab = dict(vocab_size=args.vocab, pad_id=0, bos_id=1, eos_id=2, mask_id=args.vocab - 1)
        if len(jax.devices()) < devices:
            raise ValueError(f"--devices {devices}: jax has {len(jax.devices())} devices")
        mesh = make_mesh(devices=jax.devices()[:devices])
        method = build_method(cfg, vocab, mesh)
        host_batch = synthetic_batch(args)
        tx, _, shardings = state_shardings(method, lambda m: make_optimizer(cfg.optim, 1000, m),
                                           jax.random.key(0), host_batch, DEFAULT_RULES)
        self.state = init_state(method, tx, jax.random.key(0), host_batch, shardings)
        self.batch = to_global_batch(host_batch, mesh)
        t0 = time.perf_counter()
        self.step = make_train_step(method, tx, shardings).lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.args, self.devices, self.times = args, devices, []
        _, self.state, self.metrics = time_steps(self.step, self.state, self.batch, args.warmup,
                                                 0, args.steps)

    def repeat(self) -> float:
        times, self.state, self.metrics = time_steps(self.step, self.state, self.batch, 0, 1,
                                                     self.args.steps)
        self.times += times
        return times[0]

    def result(self) -> dict:
        import jax
        step_s = statistics.median(self.times)
        return dict(framework="vlp_jax" if self.devices == 1 else f"vlp_jax ({self.devices} devices)",
                    jax=jax.__version__, batch=self.args.batch,
                    step_ms=1e3 * step_s, samples_per_sec=self.args.batch / step_s,
                    repeats_ms=[1e3 * t for t in self.times],
                    params=sum(x.size for x in jax.tree.leaves(self.state.params)),
                    flops_per_step=_flops(self.step) * self.devices,   # cost_analysis: per device
                    peak_flops_per_sec=matmul_flops_per_sec(),
                    compile_s=self.compile_s, final_loss=float(self.metrics["loss"]))


def ensure_openclip_venv() -> str:
    """Path of the venv's python; creates the venv and installs the pinned packages if absent."""
    python = os.path.join(VENV, "bin", "python")
    ok = os.path.exists(python) and subprocess.run(
        [python, "-c", "import open_clip, torch, open_clip_train.data"],
        capture_output=True).returncode == 0
    if not ok:
        print(f"creating {VENV} ({' '.join(OPENCLIP_PACKAGES)}; ~5.6 GB, several minutes)",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", *OPENCLIP_PACKAGES], check=True)
    return python


class OpenClipRow:
    """open_clip's row: `openclip_step.py --serve` in the venv, warmed up at construction;
    `repeat()` has it time `args.steps` steps while this process waits."""

    def __init__(self, args):
        python = ensure_openclip_venv()
        flags = [f"--{name}={getattr(args, _attr(name))}" for name, _ in MODEL_FLAGS]
        flags += [f"--warmup={args.warmup}", f"--steps={args.steps}", "--serve"]
        self.proc = subprocess.Popen([python, os.path.join(HERE, "openclip_step.py"), *flags],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._expect("ready")

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=60)
            raise RuntimeError(f"openclip_step.py failed:\n{self.proc.stderr.read()[-3000:]}")
        return line.strip()

    def _expect(self, word: str) -> None:
        line = self._read()
        if line != word:
            raise RuntimeError(f"openclip_step.py printed {line!r}, expected {word!r}")

    def repeat(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return float(self._read())

    def result(self) -> dict:
        self.proc.stdin.close()
        out = json.loads(self._read())
        self.proc.wait(timeout=600)
        return out


def best_step_s(r: dict) -> float:
    """The fastest timed repeat: on a shared machine, the least disturbed by other jobs."""
    return min(r["repeats_ms"]) / 1e3


def table(results: list[dict]) -> str:
    header = ["implementation", "samples/s (best)", "samples/s (median)", "step ms (best)",
              "params", "GFLOP/step", "achieved GFLOP/s", "matmul peak GFLOP/s", "% of peak"]
    rows = []
    for r in results:
        flops = r.get("flops_per_step") or r.get("matmul_flops_per_step")
        achieved = flops / best_step_s(r) if flops else None
        rows.append([r["framework"], f"{r['batch'] / best_step_s(r):.0f}",
                     f"{r['samples_per_sec']:.0f}", f"{1e3 * best_step_s(r):.1f}",
                     f"{r['params'] / 1e6:.2f} M",
                     f"{flops / 1e9:.1f}" if flops else "-",
                     f"{achieved / 1e9:.1f}" if achieved else "-",
                     f"{r['peak_flops_per_sec'] / 1e9:.0f}",
                     f"{100 * achieved / r['peak_flops_per_sec']:.0f}%" if achieved else "-"])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def run_config(args) -> None:
    """Benchmarks one config (the vlp_jax rows and, if asked, open_clip's, their repeats
    interleaved) and prints its table and ratio."""
    # open_clip warms up first, so that its warm-up does not share the cores with XLA compiling
    openclip = [OpenClipRow(args)] if args.with_open_clip else []
    rows = [VlpJaxRow(args, n) for n in args.devices] + openclip
    for _ in range(args.repeats):       # interleaved: every row sees the same machine load
        for row in rows:
            row.repeat()
    results = [row.result() for row in rows]
    for r in results:
        print(json.dumps(dict(r, config=args.config)), file=sys.stderr, flush=True)
    print(f"\nconfig {args.config}: CLIP train step, batch {args.batch}: ViT "
          f"{args.image_size}px/{args.patch_size} width {args.width} depth {args.layers} heads "
          f"{args.heads}; text width {args.text_width} depth {args.text_layers} context "
          f"{args.context} vocab {args.vocab}; embed {args.embed_dim}; AdamW; float32; "
          f"vlp_jax on {' / '.join(map(str, args.devices))} CPU device(s), open_clip in one "
          f"process with {os.cpu_count()} threads\n")
    print(table(results))
    if args.with_open_clip:
        pt = results[-1]
        for n, jx in zip(args.devices, results):
            where = "" if n == 1 else f" ({n} CPU devices, data parallel on the same cores)"
            print(f"\nvlp_jax{where} / open_clip samples/s: "
                  f"{best_step_s(pt) / best_step_s(jx):.2f} (best), "
                  f"{jx['samples_per_sec'] / pt['samples_per_sec']:.2f} (median)", flush=True)


def time_steps(step, state, batch, warmup: int, repeats: int, steps: int):
    """(seconds per step of each repeat, last state, last metrics) of `step(state, batch) ->
    (state, metrics)`: `warmup` untimed steps, then `repeats` timed runs of `steps` steps each
    (synchronised on the metrics)."""
    import jax
    metrics = None
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / steps)
    return times, state, metrics


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(HERE))
    if max(args.devices) > 1:
        import jax
        jax.config.update("jax_num_cpu_devices", max(args.devices))
    for name in (CONFIGS if args.config == "both" else (args.config,)):
        run_config(config_args(args, name))
    print("\nGFLOP/step: vlp_jax from XLA cost_analysis (all ops, fwd+bwd+optimizer); open_clip "
          "from torch FlopCounterMode (matmuls and attention only). open_clip's GELU and "
          "LayerNorm epsilon are set to vlp_jax's (tanh GELU, eps 1e-6): both compute the same "
          "function.")


if __name__ == "__main__":
    main()
