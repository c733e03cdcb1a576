"""Sweeps: train every variant an ablation experiment file lists, then tabulate the results.

An ablation file is an ordinary experiment file (`get_config(arg)`) that also names its
variants, as short-argument strings for `get_config`:

    VARIANTS = ["ratio=0", "ratio=0.5", "ratio=0.75"]        # or: def get_sweep(): ...

or, in a family file whose `get_config` takes a `variant=<name>` argument, a dict of named
presets, `VARIANTS = {"vilt": {...}, "uniter": {...}}`: its sweep variants are
"variant=vilt", "variant=uniter", ... (the dict's keys, in order; the presets' contents are the
experiment file's business).

    vlp-jax sweep --config experiments/ablation_flip_ratio.py --workdir W
    vlp-jax sweep --config experiments/ablation_flip_ratio.py:smoke --workdir W

trains variant v from `get_config("v[,base_arg]")` into W/<v>/ (a finished variant is not
retrained, an interrupted one resumes from its checkpoint) and writes W/sweep.json and
W/sweep.md: one row per variant with its final training metrics and evaluation results.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import ml_collections

from vlp_jax.config_args import apply_overrides, load_module
from vlp_jax.train.metrics_log import read_metrics

TRAIN_COLUMNS = ("loss", "steps_per_sec")


def list_variants(path: str) -> list[str]:
    """The variants an ablation file declares: `get_sweep()`, a list `VARIANTS` of argument
    strings, or a dict `VARIANTS` of named presets -> ['variant=<name>', ...]."""
    module = load_module(path)
    if hasattr(module, "get_sweep"):
        variants = list(module.get_sweep())
    elif isinstance(getattr(module, "VARIANTS", None), Mapping):
        variants = [f"variant={name}" for name in module.VARIANTS]
    elif hasattr(module, "VARIANTS"):
        variants = list(module.VARIANTS)
    else:
        raise ValueError(f"{path} declares no variants: define VARIANTS = ['a=1', ...] or "
                         f"get_sweep() to use it with `vlp-jax sweep`")
    if not variants or len(set(variants)) != len(variants):
        raise ValueError(f"{path}: the variant list must be non-empty and unique, got {variants}")
    return variants


def variant_dirname(variant: str) -> str:
    """A directory name for a variant string ('ratio=0.5' stays; '/', ',' and spaces -> '_')."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", variant) or "default"


def variant_config(path: str, variant: str, base_arg: str = "") -> ml_collections.ConfigDict:
    """get_config('variant,base_arg') of the ablation file."""
    module = load_module(path)
    return module.get_config(",".join(a for a in (variant, base_arg) if a))


def _finished(run_dir: str, num_steps: int) -> bool:
    path = os.path.join(run_dir, "eval.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("step") == num_steps


def summarize(run_dir: str) -> dict[str, Any]:
    """Final training metrics (the last logged row) and eval.json results of one run."""
    row: dict[str, Any] = {}
    train_rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    if train_rows:
        last = train_rows[-1]
        row["step"] = last["step"]
        for key in TRAIN_COLUMNS:
            if f"train/{key}" in last:
                row[f"train/{key}"] = last[f"train/{key}"]
    path = os.path.join(run_dir, "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
        row["step"] = results.pop("step", row.get("step"))
        row.update({f"eval/{k}": v for k, v in results.items()})
    return row


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """A markdown table: one row per variant, one column per metric (union over rows)."""
    columns = ["variant"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    head = [f"# {title}", ""] if title else []
    lines = head + ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict[str, Any]], workdir: str, title: str = "") -> None:
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump(list(rows), f, indent=2)
    with open(os.path.join(workdir, "sweep.md"), "w") as f:
        f.write(markdown_table(rows, title))


def run_sweep(spec: str, workdir: str, variants: Sequence[str] | None = None,
              overrides: dict[str, Any] | None = None,
              configure: Callable[[ml_collections.ConfigDict], Any] | None = None,
              progress: bool = False) -> list[dict[str, Any]]:
    """Trains every variant of `spec` ('file.py[:base_arg]') into workdir/<variant>/.

    overrides: typed dotted fields set on every variant (the CLI's --config.a.b=v, converted
      by `config_args.parse_overrides`);
    configure: optional callable editing each variant's config in place (tests use it to
      shrink models onto a tiny dataset).
    Returns the table rows (also written to workdir/sweep.json and workdir/sweep.md).
    """
    from vlp_jax.train.trainer import train_and_evaluate
    path, _, base_arg = spec.partition(":")
    variants = list(variants) if variants is not None else list_variants(path)
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for variant in variants:
        config = apply_overrides(variant_config(path, variant, base_arg), overrides or {})
        if configure is not None:
            configure(config)
        run_dir = os.path.join(workdir, variant_dirname(variant))
        if not _finished(run_dir, config.train.num_steps):
            train_and_evaluate(config, run_dir, progress=progress)
        rows.append({"variant": variant, **summarize(run_dir)})
        write_table(rows, workdir, title=os.path.basename(spec))   # partial table as we go
    return rows
