"""ViLT's long recipe regression: `experiments/vilt_shapes.py` at width 32 for 1,800 steps.

The suite's ViLT learning test trains a shorter run (it shows that ITM and MLM both learn); this
script runs the recipe as the README reports it (ITM-first warm-up for 45% of the steps, then
MLM + ITM + 0.1 WPA summed) on the test-sized shapes data (24 px, 512 / 128 / 128 scenes, one
device) and prints its figures: training ITM / MLM accuracy (mean of the last three logged
batches) and the held-out ITM pair accuracy (own image vs a random other one, chance 50%).

    python benchmarks/vilt_recipe.py                 # 1,800 steps, ~4 min on the 2-core machine
    python benchmarks/vilt_recipe.py --steps 600
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_config(steps: int, data_dir: str):
    """vilt_shapes.py (`:smoke,steps=N`) with a width-32, 2-layer single stream on 24 px."""
    import ml_collections

    from vlp_jax.config_args import load_config
    from vlp_jax.data.pipeline import tiny_data_config
    config = load_config(os.path.join(ROOT, "experiments", f"vilt_shapes.py:smoke,steps={steps}"))
    config.data = tiny_data_config(data_dir=data_dir)
    res = config.data.image_size
    config.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    config.model.image.update(image_size=res, patch_size=res // 4)
    config.model.text.context_length = config.data.text_length
    config.optim.update(lr=1e-3, warmup_steps=20)
    config.train.update(batch_size=32, num_steps=steps, log_every=25, checkpoint_every=steps)
    config.mesh = ml_collections.ConfigDict(dict(num_devices=1))
    config.evals = ml_collections.ConfigDict(dict(rerank=dict(
        type="itm_rerank_retrieval", split="validation", max_examples=64, batch_size=64, k=8)))
    return config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = p.parse_args(argv)
    import numpy as np

    from vlp_jax.train.metrics_log import read_metrics
    from vlp_jax.train.trainer import train_and_evaluate
    workdir = args.workdir or tempfile.mkdtemp(prefix="vilt_recipe_")
    config = recipe_config(args.steps, os.path.join(workdir, "data"))
    t0 = time.perf_counter()
    result = train_and_evaluate(config, os.path.join(workdir, "run"), progress=False)
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(os.path.join(workdir, "run")) if "train/loss" in r]
    tail = {k: float(np.mean([r[k] for r in rows[-3:]])) for k in ("train/itm/itm_acc",
                                                                    "train/mlm/mlm_acc")}
    ev = result["eval"]
    print("| steps | wall s | train ITM acc | train MLM acc | held-out ITM pair acc |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {args.steps} | {wall:.0f} | {tail['train/itm/itm_acc']:.3f} | "
          f"{tail['train/mlm/mlm_acc']:.3f} | {ev['rerank/itm_pair_acc']:.1f} |")


if __name__ == "__main__":
    main()
