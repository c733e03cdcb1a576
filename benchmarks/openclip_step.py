"""open_clip (PyTorch, CPU) train-step throughput for the config of `train_throughput.py`.

Runs inside `benchmarks/.venv-openclip` (torch 2.14.1, torchvision 0.29.1, open_clip_torch),
never in the JAX environment. Builds `open_clip.CLIP` from a custom vision/text config with
vlp_jax's activation and normalisation (`match_vlp_jax`: tanh-approximate GELU, as flax's
`nn.gelu`, and LayerNorm epsilon 1e-6; open_clip's defaults are exact-erf GELU and 1e-5), trains
with AdamW + `ClipLoss` (+ global-norm clipping, as vlp_jax's optimizer) on one random batch,
and prints one JSON line: samples/s, step time, parameter count, matmul FLOPs per step
(torch's FlopCounterMode: 2 M N K per matmul, forward + backward) and this process's measured
large-matmul FLOP/s.

With `--serve` it warms up, prints `ready`, then times one repeat of `--steps` steps for each
`run` line read from stdin (printing its seconds per step) and prints the JSON line at end of
input: `train_throughput.py` interleaves these repeats with vlp_jax's, so that both frameworks
are timed under the same load of a shared machine.

    benchmarks/.venv-openclip/bin/python benchmarks/openclip_step.py --batch 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (best and median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    p.add_argument("--serve", action="store_true",
                   help="time one repeat per `run` line on stdin (see the module doc)")
    return p.parse_args(argv)


def build(args) -> open_clip.CLIP:
    vision = CLIPVisionCfg(layers=args.layers, width=args.width,
                           head_width=args.width // args.heads, mlp_ratio=4.0,
                           patch_size=args.patch_size, image_size=args.image_size)
    text = CLIPTextCfg(context_length=args.context, vocab_size=args.vocab,
                       width=args.text_width, heads=args.text_heads, layers=args.text_layers,
                       mlp_ratio=4.0)
    return open_clip.CLIP(embed_dim=args.embed_dim, vision_cfg=vision, text_cfg=text)


def match_vlp_jax(model: torch.nn.Module) -> torch.nn.Module:
    """Makes `model` compute vlp_jax's function: every GELU the tanh approximation
    (vlp_jax's MLP uses flax `nn.gelu`, approximate=True) and every LayerNorm eps 1e-6
    (vlp_jax's `layer_norm`). Raises if the model has no GELU (a change in open_clip)."""
    gelus = [m for m in model.modules() if isinstance(m, torch.nn.GELU)]
    if not gelus:
        raise RuntimeError("open_clip model has no torch.nn.GELU to match vlp_jax's tanh GELU")
    for m in gelus:
        m.approximate = "tanh"
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    return model


def random_batch(args, gen: torch.Generator):
    """Images in [-1, 1]; captions `bos w... eot pad...` with eot the largest id (open_clip's
    'argmax' pooling finds it that way)."""
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=gen) * 2 - 1
    text = torch.zeros(args.batch, args.context, dtype=torch.long)
    lengths = torch.randint(2, args.context - 1, (args.batch,), generator=gen)
    for i, n in enumerate(lengths.tolist()):
        text[i, 0] = 1
        text[i, 1:n + 1] = torch.randint(2, args.vocab - 1, (n,), generator=gen)
        text[i, n + 1] = args.vocab - 1
    return images, text


def make_step(model, optimizer, loss_fn, images, text):
    def step():
        image_f, text_f, scale = model(images, text)
        loss = loss_fn(image_f, text_f, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss
    return step


def matmul_flops_per_sec(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


def step_flops(step) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = match_vlp_jax(build(args)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                                  weight_decay=0.1)
    images, text = random_batch(args, torch.Generator().manual_seed(0))
    step = make_step(model, optimizer, open_clip.ClipLoss(), images, text)
    for _ in range(args.warmup):
        step()

    def repeat() -> tuple[float, float]:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        loss = loss.detach().item()
        return (time.perf_counter() - t0) / args.steps, loss

    times, loss = [], float("nan")
    if args.serve:
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                raise SystemExit(f"openclip_step.py --serve: unknown command {line.strip()!r}")
            t, loss = repeat()
            times.append(t)
            print(t, flush=True)
    else:
        for _ in range(args.repeats):
            t, loss = repeat()
            times.append(t)
    step_s = statistics.median(times)
    print(json.dumps(dict(
        framework="open_clip", torch=torch.__version__, open_clip=open_clip.__version__,
        threads=torch.get_num_threads(), batch=args.batch, step_ms=1e3 * step_s,
        samples_per_sec=args.batch / step_s, repeats_ms=[1e3 * t for t in times],
        params=sum(p.numel() for p in model.parameters()),
        matmul_flops_per_step=step_flops(step), peak_flops_per_sec=matmul_flops_per_sec(),
        final_loss=loss)))


if __name__ == "__main__":
    main()
