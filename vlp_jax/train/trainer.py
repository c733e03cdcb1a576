"""The one trainer: every method trains through `train_and_evaluate(config, workdir)`.

Flow: mesh -> data (built if absent) -> method -> sharded TrainState (restored from the
latest checkpoint in WORKDIR if there is one, with the data iterator position) -> jitted steps
with periodic logging and checkpoints -> evaluators -> WORKDIR/eval.json.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp_jax.config_schema import resolve
from vlp_jax.methods.base import Method
from vlp_jax.methods.registry import build_method
from vlp_jax.parallel.mesh import data_parallel_size, make_mesh, to_global_batch
from vlp_jax.parallel.sharding import logical_rules
from vlp_jax.train import data_bridge
from vlp_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from vlp_jax.train.errors import (CheckpointMismatchError, NoCheckpointError,  # noqa: F401
                                  NonFiniteError)
from vlp_jax.train.flops import peak_flops_per_device, step_flops, utilisation
from vlp_jax.train.metrics_log import MetricWriter, to_python
from vlp_jax.train.preemption import Preempted, PreemptionGuard
from vlp_jax.train.optim import learning_rate_schedule, make_optimizer
from vlp_jax.train.predict import Predictor
from vlp_jax.train.step import init_state, make_train_step, state_shardings


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
    """Checks that need no compilation; raises ValueError naming the field and valid values."""
    dp = data_parallel_size(mesh)
    bs = config.train.batch_size
    if bs <= 0 or bs % dp:
        raise ValueError(f"train.batch_size={bs} must be a positive multiple of the data-parallel "
                         f"size {dp} (mesh {dict(mesh.shape)})")
    if bs % jax.process_count():
        raise ValueError(f"train.batch_size={bs} must be divisible by the process count "
                         f"{jax.process_count()}")
    if config.train.num_steps <= 0:
        raise ValueError(f"train.num_steps must be positive, got {config.train.num_steps}")
    method = config.method
    for old, new in (("warm_start", "init (ConfigDict(workdir, step, mapping={dest: src}))"),
                     ("frozen", "frozen (a list of regexes over '/'-joined parameter paths)")):
        if old in method:
            raise ValueError(f"method.{old} was replaced by the top-level config.{new}, which "
                             f"works for every method; e.g. LiT: config.init.mapping = "
                             f"{{'image_tower': 'image_tower', 'image_proj': 'image_proj'}}, "
                             f"config.frozen = ['image_tower/.*', 'image_proj/.*']")
    pieces = method.get("micro_batches", 1)
    if method.get("accumulation", "none") != "none" and (pieces < 1 or (bs // dp) % pieces):
        raise ValueError(f"method.micro_batches={pieces} must divide the per-device batch "
                         f"{bs // dp} (train.batch_size={bs} over {dp} devices)")
    for name, ev in (config.get("evals", None) or {}).items():
        eval_bs = ev.get("batch_size", None) or 256
        if eval_bs % dp:
            raise ValueError(f"evals.{name}.batch_size={eval_bs} must be a multiple of the "
                             f"data-parallel size {dp} (mesh {dict(mesh.shape)})")
    model, data = config.model, config.data
    image = model.get("image", None)
    if image is not None and "image_size" in image and image.image_size != data.image_size:
        raise ValueError(f"model.image.image_size={image.image_size} contradicts "
                         f"data.image_size={data.image_size}")
    text = model.get("text", None)
    if text is not None and "context_length" in text and text.context_length < data.text_length:
        raise ValueError(f"model.text.context_length={text.context_length} is shorter than "
                         f"data.text_length={data.text_length}")


class Experiment:
    """Everything built from a config that both training and evaluation need."""

    def __init__(self, config: ml_collections.ConfigDict):
        config = resolve(config)   # every key checked, declared defaults filled in
        self.config = config
        self.mesh = make_mesh(config.get("mesh", None))
        validate_config(config, self.mesh)
        self.data = data_bridge.DataBridge(config.data)
        self.method: Method = build_method(config, self.data.vocab(), self.mesh)
        rng = jax.random.key(config.get("seed", 0))
        total = config.train.num_steps
        self.lr_schedule = learning_rate_schedule(config.optim, total)
        self.frozen = tuple(config.get("frozen", None) or ())
        self.tx, self.abstract_state, self.shardings = state_shardings(
            self.method, lambda mask: make_optimizer(config.optim, total, mask), rng,
            self.data.example_shapes(), logical_rules(config.get("mesh")), frozen=self.frozen)
        self.predictor = Predictor(self.method.predict_fns(), self.shardings.params, self.mesh)
        self._rng = rng

    def new_state(self):
        """A fresh TrainState (with `config.init` subtrees read from their checkpoint)."""
        return init_state(self.method, self.tx, self._rng, self.data.example_shapes(),
                          self.shardings, init=self.config.get("init", None))

    def restore_target(self):
        return abstract_with_shardings(self.abstract_state, self.shardings)

    def predict_fns(self, params) -> dict:
        """The evaluators' `PredictFns`: the method's prediction functions, jitted once,
        bound to `params`."""
        return self.predictor.bind(params)

    def evaluate(self, params, evals=None) -> dict[str, float]:
        """Runs `evals` (default: all of config.evals) with the jitted prediction functions
        bound to `params` -> {'<name>/<metric>': float}."""
        from vlp_jax.evaluators import run_evaluators
        from vlp_jax.evaluators.protocol import TextCodec
        evals = self.config.get("evals", None) if evals is None else evals
        if not evals:
            return {}
        return run_evaluators(evals, self.predict_fns(params), self.data.load_eval_set,
                              TextCodec(self.data.tokenize, self.data.detokenize))


def _write_json(path: str, payload: dict) -> None:
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints), then evaluates.

    `stop_at`: leave the loop after that step with a checkpoint and no final evaluation, as a
    preempted job would (tests use it to check that resuming is exact).

    Evaluators with `log_steps` = N also run every N steps during training (not at the last
    step: the final evaluation covers it); their metrics join metrics.jsonl as `eval/...`
    rows at that step. Returns dict(step, final train metrics, eval metrics, data: {kind:
    count} of the bad records met since the run began, resumes included, summed over
    processes; see `vlp_jax.data.sanitize.ISSUE_KINDS`). Writes metrics.jsonl (train rows
    also carry the running `data/<kind>` counts), TensorBoard events, checkpoints/ and
    eval.json under workdir.
    """
    os.makedirs(workdir, exist_ok=True)
    exp = Experiment(config)
    tcfg = config.train
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.get("keep_checkpoints", 2),
                        every=tcfg.get("checkpoint_every", 1000))
    data_iter = exp.data.train_iterator(tcfg.batch_size, seed=config.get("seed", 0))
    restored = ckpt.restore(exp.restore_target())
    if restored is None:
        state = exp.new_state()
    else:
        state, data_state = restored
        data_iter.set_state(data_state)
    start, skipped_before = int(state.step), int(state.nonfinite)
    step_fn = make_train_step(exp.method, exp.tx, exp.shardings, tcfg.get("nonfinite", "skip"),
                              exp.lr_schedule, frozen=exp.frozen, stop_baseline=skipped_before)
    writer = MetricWriter(workdir)
    bar = _progress_bar(progress, start, tcfg.num_steps)
    with PreemptionGuard() as guard:
        state, last = _train_loop(exp, state, data_iter, step_fn, ckpt, writer, bar, guard,
                                  start, stop_at)
    if bar is not None:
        bar.close()
    ckpt.close()
    data = data_issue_totals(data_iter)
    if stop_at is not None and int(state.step) < tcfg.num_steps:
        writer.close()
        return {"step": int(state.step), "train": last, "eval": {}, "data": data}
    results = exp.evaluate(state.params)
    writer.write(int(state.step), results, prefix="eval")
    writer.close()
    _write_json(os.path.join(workdir, "eval.json"), {"step": int(state.step), **results})
    return {"step": int(state.step), "train": last, "eval": results, "data": data}


def data_issue_totals(data_iter) -> dict[str, int]:
    """{kind: count} of bad records consumed so far by every process's iterator (all
    processes must call it together)."""
    local = data_iter.issue_totals()
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    counts = np.asarray([local[k] for k in local], np.int64)
    summed = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, len(local))
    return {k: int(v) for k, v in zip(local, summed.sum(axis=0))}


def evals_due(evals_config, step: int, num_steps: int) -> dict:
    """The evaluators of `config.evals` whose `log_steps` divides `step` (never the last step,
    which the final evaluation covers): {name: config}."""
    if step >= num_steps or not evals_config:
        return {}
    return {name: cfg for name, cfg in evals_config.items()
            if (cfg.get("log_steps", None) or 0) > 0 and step % cfg["log_steps"] == 0}


class _StopWatch:
    """train.nonfinite='stop' without a host synchronisation per step.

    The step's `finite` flags stay on the device; `check()` (at log steps, checkpoint steps,
    before a preemption checkpoint and at the end) fetches them all at once. From the first
    non-finite step on the train step applies no update at all (`make_train_step`'s
    `stop_baseline`), so the state keeps the last good parameters; up to log_every - 1 more
    steps may run before the check, each skipped and counted as non-finite."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.window: list[tuple[int, dict]] = []

    def add(self, step: int, metrics: dict) -> None:
        if self.enabled:
            self.window.append((step, metrics))

    def check(self, state, step: int, data_iter, ckpt) -> None:
        if not self.enabled or not self.window:
            return
        flags = jax.device_get([m["finite"] for _, m in self.window])
        bad = [(s, m) for (s, m), f in zip(self.window, flags) if not float(f)]
        self.window = []
        if not bad:
            return
        first, metrics = bad[0]
        ckpt.save(step, state, data_iter.get_state, force=True)
        ckpt.close()
        names = sorted(k for k, v in to_python(metrics).items() if not np.isfinite(v))
        later = (f"; steps {first + 1}..{step} ran after it and were skipped too"
                 if step > first else "")
        raise NonFiniteError(
            f"train.nonfinite='stop': non-finite values at step {first} in "
            f"{names or ['gradients']}; the update was not applied{later}: checkpoint {step} "
            f"holds the last good parameters (those after step {first - 1}) and a data "
            f"position past the bad batch")


class _Utilisation:
    """The log line's FLOP figures (`vlp_jax.train.flops`): the step's FLOPs are counted once,
    at the first log step, from the lowered step on abstract (state, batch)."""

    def __init__(self, exp, step_fn):
        self.exp, self.step_fn, self.flops = exp, step_fn, None
        self.peak = peak_flops_per_device(exp.mesh.devices.flat[0],
                                          exp.config.train.get("peak_flops", None))

    def __call__(self, state, batch, steps_per_sec: float) -> dict[str, float]:
        if self.flops is None:
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                (state, batch))
            self.flops = step_flops(self.step_fn, *abstract)
        return dict(utilisation(self.flops, steps_per_sec, self.exp.config.train.batch_size,
                                self.exp.mesh.devices.size, self.peak),
                    flops_per_step=self.flops)


def _train_loop(exp, state, data_iter, step_fn, ckpt, writer, bar, guard, start, stop_at):
    """Runs steps start+1 .. num_steps (or stop_at); returns (state, last logged metrics).

    The host waits for the device only at log steps (metrics), checkpoint steps, evaluation
    steps and every `train.preemption_check_every` steps (the cross-process preemption
    check); the data iterator's state is taken only when a checkpoint is written."""
    tcfg = exp.config.train
    num_steps = tcfg.num_steps
    log_every = max(1, tcfg.get("log_every", 50))
    check_every = max(1, tcfg.get("preemption_check_every", 10))
    stop = _StopWatch(tcfg.get("nonfinite", "skip") == "stop")
    last, t0, n0, waited = {}, time.perf_counter(), start, 0.0
    speed = _Utilisation(exp, step_fn)
    for step in range(start + 1, num_steps + 1):
        t_data = time.perf_counter()
        batch = to_global_batch(next(data_iter), exp.mesh)
        waited += time.perf_counter() - t_data
        state, metrics = step_fn(state, batch)
        stop.add(step, metrics)
        final = step == num_steps or step == stop_at
        if step % log_every == 0 or final:
            stop.check(state, step, data_iter, ckpt)
            last = to_python(metrics)
            dt = time.perf_counter() - t0
            last["steps_per_sec"] = (step - n0) / dt
            last["examples_per_sec"] = last["steps_per_sec"] * tcfg.batch_size
            last.update(speed(state, batch, last["steps_per_sec"]),
                        data_wait_fraction=min(1.0, waited / dt))
            writer.write(step, last, extra={f"data/{k}": v
                                            for k, v in data_issue_totals(data_iter).items()})
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.4f}", ex_s=f"{last['examples_per_sec']:.0f}",
                                mfu=f"{last['mfu']:.1%}", data=f"{last['data_wait_fraction']:.0%}")
            t0, n0, waited = time.perf_counter(), step, 0.0
        if bar is not None:
            bar.update(1)
        if final or ckpt.due(step):
            stop.check(state, step, data_iter, ckpt)
            ckpt.save(step, state, data_iter.get_state, force=final)
        due = evals_due(exp.config.get("evals", None), step, num_steps)
        if due:
            stop.check(state, step, data_iter, ckpt)
            writer.write(step, exp.evaluate(state.params, due), prefix="eval")
            t0, n0, waited = time.perf_counter(), step, 0.0   # evaluation is not training speed
        if step == stop_at:
            break
        if step % check_every == 0 and not final and guard.requested():
            stop.check(state, step, data_iter, ckpt)
            ckpt.save(step, state, data_iter.get_state, force=True)
            ckpt.close()
            raise Preempted(step)
    return state, last


def restore_experiment(config: ml_collections.ConfigDict, workdir: str,
                       step: int | None = None) -> tuple["Experiment", Any]:
    """(Experiment, TrainState) of the latest (or given) checkpoint in workdir. Raises
    NoCheckpointError / CheckpointMismatchError (one-line messages)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise NoCheckpointError(f"no checkpoint to evaluate: {directory} does not exist")
    exp = Experiment(config)
    ckpt = Checkpointer(directory)
    try:
        restored = ckpt.restore(exp.restore_target(), step)
    finally:
        ckpt.close()
    if restored is None:
        raise NoCheckpointError(f"no checkpoint to evaluate in {directory}")
    return exp, restored[0]


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> dict[str, Any]:
    """Restores the latest (or given) checkpoint in workdir, runs config.evals, writes eval.json.

    Raises NoCheckpointError (workdir without checkpoints, or no such step) and
    CheckpointMismatchError (a checkpoint of another model or config), one-line messages."""
    exp, state = restore_experiment(config, workdir, step)
    results = exp.evaluate(state.params)
    _write_json(os.path.join(workdir, "eval.json"), {"step": int(state.step), **results})
    return {"step": int(state.step), "eval": results}


def _progress_bar(enabled: bool, start: int, total: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
