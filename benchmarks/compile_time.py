"""Compile time of the CLIP train step against depth, with and without `nn.scan` over layers.

The shared train step of `step_memory.py`'s CLIP (ViT-B/16 widths by default: 224 px, patch 16,
width 768; text width 512, context 77) is lowered and compiled for abstract inputs (nothing
runs) at each depth (layers per tower), once with the blocks as a Python loop and once scanned
(`model.scan_layers=True`): with the loop the program, and XLA's compile time, grow with depth;
scanned, one block is compiled whatever the depth.

    python benchmarks/compile_time.py                          # B/16 widths, depths 1,2,4,8,12
    python benchmarks/compile_time.py --model tiny --depths 1,2,4,8
"""
from __future__ import annotations

import argparse
import os
import sys


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="b16", choices=("b16", "tiny"))
    p.add_argument("--depths", default="1,2,4,8,12", help="layers per tower")
    p.add_argument("--batch", type=int, default=32, help="global batch (one device)")
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = _parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.step_memory import experiment_config, step_memory  # noqa: E402


def main(args) -> None:
    depths = [int(d) for d in args.depths.split(",")]
    print(f"# {args.model} CLIP train step, batch {args.batch}, one device: lower + compile "
          "seconds (nothing executed)\n")
    print("| layers per tower | loop (s) | scanned (s) | loop / scanned |")
    print("|---:|---:|---:|---:|")
    for depth in depths:
        seconds = []
        for scan in (False, True):
            cfg = experiment_config(args.model, {"data": 1}, {"scan_layers": scan}, {}, depth)
            seconds.append(step_memory(cfg, args.model, args.batch)["compile_s"])
        print(f"| {depth} | {seconds[0]:.1f} | {seconds[1]:.1f} | {seconds[0] / seconds[1]:.2f} |",
              flush=True)


if __name__ == "__main__":
    main(ARGS)
