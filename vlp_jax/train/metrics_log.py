"""Metric sinks: JSON lines in WORKDIR/metrics.jsonl and TensorBoard events (process 0 only)."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np


def to_python(metrics: Mapping) -> dict[str, float]:
    """Device scalars -> plain floats (NaN/inf kept as floats; JSON writes them as NaN/Infinity)."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._path = os.path.join(workdir, "metrics.jsonl")
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter   # imported lazily: only process 0 writes
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train",
              extra: Mapping[str, float] | None = None) -> None:
        """One row {'step', '<prefix>/<name>': value, ...}; `extra` keys (already full names,
        e.g. 'data/resized') join the same row."""
        if not self.enabled:
            return
        values = {**{f"{prefix}/{k}": v for k, v in metrics.items()}, **dict(extra or {})}
        row = {"step": int(step), **values}
        with open(self._path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All rows of WORKDIR/metrics.jsonl (for tests, notebooks and sweeps)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
