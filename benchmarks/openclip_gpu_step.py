"""open_clip's ViT-B-16 CLIP train-step throughput with `--precision amp_bf16` semantics.

The open_clip half of `benchmarks/gpu_clip.py`; runs inside `benchmarks/.venv-openclip`
(torch 2.14.1, torchvision 0.29.1, open_clip_torch), never in the JAX environment. What it
reproduces of open_clip's `training/train.py` with `--precision amp_bf16`:

* float32 parameters and AdamW state; the forward pass and the loss inside
  `torch.autocast(device_type, dtype=torch.bfloat16)` (open_clip's `get_autocast`), no grad
  scaler (open_clip uses one for 'amp' fp16 only);
* attention through `nn.MultiheadAttention(need_weights=False)`, which calls
  `F.scaled_dot_product_attention` (SDPA: flash / memory-efficient kernels on CUDA);
* `ClipLoss`, AdamW (betas 0.9 / 0.98, eps 1e-6, weight decay 0.1), `clip_grad_norm_(1.0)`.

`--model ViT-B-16` builds `open_clip.create_model('ViT-B-16')` (random weights, 224 px, 77
tokens, vocabulary 49,408); `--model custom` builds `open_clip.CLIP` from the size flags (the
`--tiny` CPU check). One synthetic batch stays on the device; after `--warmup` steps,
`--repeats` runs of `--steps` steps are timed (CUDA synchronised). Prints one JSON line.

    benchmarks/.venv-openclip/bin/python benchmarks/openclip_gpu_step.py --batch 256
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from openclip_step import random_batch   # same folder: the script's sys.path[0]

PRECISIONS = ("amp_bf16", "fp32")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16", help="'ViT-B-16' or 'custom' (size flags)")
    p.add_argument("--precision", default="amp_bf16", choices=PRECISIONS)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--text-width", type=int, default=512)
    p.add_argument("--text-layers", type=int, default=12)
    p.add_argument("--text-heads", type=int, default=8)
    p.add_argument("--context", type=int, default=77)
    p.add_argument("--vocab", type=int, default=49408)
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the model "
                   "(open_clip's --torchcompile; off by default, as in open_clip)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cuda', 'cpu'")
    return p.parse_args(argv)


def build(args) -> torch.nn.Module:
    if args.model == "ViT-B-16":
        return open_clip.create_model("ViT-B-16", pretrained=None)
    if args.model != "custom":
        raise ValueError(f"--model must be 'ViT-B-16' or 'custom', got {args.model!r}")
    vision = CLIPVisionCfg(layers=args.layers, width=args.width,
                           head_width=args.width // args.heads, mlp_ratio=4.0,
                           patch_size=args.patch_size, image_size=args.image_size)
    text = CLIPTextCfg(context_length=args.context, vocab_size=args.vocab, width=args.text_width,
                       heads=args.text_heads, layers=args.text_layers, mlp_ratio=4.0)
    return open_clip.CLIP(embed_dim=args.embed_dim, vision_cfg=vision, text_cfg=text)


def make_step(model, optimizer, loss_fn, images, text, device_type: str, precision: str):
    def autocast():
        if precision == "amp_bf16":
            return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        return torch.autocast(device_type=device_type, enabled=False)

    def step():
        with autocast():
            image_f, text_f, scale = model(images, text)[:3]
            loss = loss_fn(image_f, text_f, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():   # open_clip clamps the logit scale after the step
            model.logit_scale.clamp_(0, 4.6052)
        return loss
    return step


def main(argv=None):
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    torch.manual_seed(0)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # what open_clip's main.py sets on CUDA
        torch.backends.cudnn.benchmark = True
    model = build(args).to(device).train()
    if args.torch_compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                                  weight_decay=0.1)
    images, text = random_batch(args, torch.Generator().manual_seed(0))
    images, text = images.to(device), text.to(device)
    step = make_step(model, optimizer, open_clip.ClipLoss(), images, text, device,
                     args.precision)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    for _ in range(args.warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        times.append((time.perf_counter() - t0) / args.steps)
    loss = loss.detach().float().item()
    step_s = statistics.median(times)
    print(json.dumps(dict(
        framework="open_clip", torch=torch.__version__, open_clip=open_clip.__version__,
        model=args.model, precision=args.precision, device=device,
        device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        sdpa_flash=bool(torch.backends.cuda.flash_sdp_enabled()),
        torch_compile=args.torch_compile, batch=args.batch, step_ms=1e3 * step_s,
        samples_per_sec=args.batch / step_s, repeats_ms=[1e3 * t for t in times],
        params=sum(p.numel() for p in model.parameters()),
        peak_memory_gib=(torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda"
                         else None),
        final_loss=loss)))


if __name__ == "__main__":
    main()
