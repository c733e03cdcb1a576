"""Objectives and the one combiner that weights, schedules or samples them.

An objective is a named pure unit. Per step it receives an `ObjectiveInput`:

    params    the parameters being differentiated (the student),
    outputs   a dict of model outputs computed once by the method and shared by the objectives
              (e.g. {'image_emb': [B, D], 'text_emb': [B, D], 'image_pooled': [B, W]}); an
              objective that needs its own forward pass applies the model itself,
    batch     the batch after `prepare_batch` (caption choice, MLM masking, ...),
    rng       a key of its own (the combiner folds the objective's index into the step key),
    step      int32 [], the optimizer step,
    state     the objective's own state (its entry of the combiner's state; {} if none),
    shared    state shared between objectives (the EMA teacher's parameters, ...),

and returns (loss [], metrics {name: array}, new state). `prepare_batch(batch, rng)` runs
before differentiation, outside `jax.value_and_grad`: random choices of inputs (LaCLIP's
caption, MLM masks) are drawn once per step, not once per trace.

The `Combiner` holds `Term`s (objective, weight, start_step, ramp_steps, task) and returns

    L(step) = sum_o w_o(step) * L_o,   w_o(step) = weight_o * clip((step - start_o) / ramp_o, 0, 1)

(ramp_o = 0: a step function at start_o; before start_o the objective is still computed and
logged, its weight is 0), or, with mixing='sample' (UNITER, Chen et al. 2020 sec. 3.2), one
*task* per step drawn with P(t) = r_t / sum r, only that task's terms computed (`lax.switch`).
Metrics are named uniformly: `<objective>/<metric>`, `loss/<objective>` (unweighted) and
`weight/<objective>` for scheduled terms; `task_id` in sampling mode.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from vlp_jax.losses.task_sampler import sample_task

MIXING = ("sum", "sample")


class LazyOutputs(dict):
    """Model outputs computed on first use: `producers` {name: fn() -> value} next to eager
    values. The combiner hands each run (each sampled task's branch) a fresh memo, so a
    forward pass shared by several objectives (ViLT's ITM pairs, read by ITM and WPA) is traced
    once per branch and only in the branches whose objectives read it."""

    def __init__(self, eager: dict | None = None, producers: dict | None = None):
        super().__init__(eager or {})
        self.producers = dict(producers or {})

    def __missing__(self, key):
        if key not in self.producers:
            raise KeyError(key)
        value = self[key] = self.producers[key]()
        return value

    def __contains__(self, key):
        return dict.__contains__(self, key) or key in self.producers

    def fresh(self) -> "LazyOutputs":
        return LazyOutputs({k: v for k, v in self.items() if k not in self.producers},
                           self.producers)


@dataclasses.dataclass(frozen=True)
class ObjectiveInput:
    params: Any
    outputs: dict
    batch: dict
    rng: jax.Array
    step: jax.Array
    state: Any = None
    shared: Any = None


class Objective:
    """Base class: override `__call__`; `init_state` / `prepare_batch` default to nothing."""

    name: str = "objective"

    def init_state(self, params) -> Any:
        return {}

    def prepare_batch(self, batch: dict, rng: jax.Array) -> dict:
        return batch

    def __call__(self, inp: ObjectiveInput) -> tuple[jax.Array, dict, Any]:
        raise NotImplementedError


class FnObjective(Objective):
    """An objective from a stateless function fn(inp) -> (loss [], metrics)."""

    def __init__(self, name: str, fn: Callable[[ObjectiveInput], tuple[jax.Array, dict]]):
        self.name, self.fn = name, fn

    def __call__(self, inp):
        loss, metrics = self.fn(inp)
        return loss, metrics, inp.state


def weight_schedule(step, weight: float, start_step: int = 0, ramp_steps: int = 0) -> jax.Array:
    """weight * clip((step - start) / ramp, 0, 1); ramp 0: weight from `start_step` on.
    Returns float32 []."""
    step = jnp.asarray(step, jnp.float32)
    if ramp_steps > 0:
        frac = jnp.clip((step - start_step) / float(ramp_steps), 0.0, 1.0)
    else:
        frac = (step >= start_step).astype(jnp.float32)
    return jnp.float32(weight) * frac


@dataclasses.dataclass(frozen=True)
class Term:
    objective: Objective
    weight: float = 1.0
    start_step: int = 0
    ramp_steps: int = 0
    task: str | None = None          # sampling mode: the task it belongs to (default: its name)

    def __post_init__(self):
        if self.start_step < 0 or self.ramp_steps < 0:
            raise ValueError(f"objective {self.name!r}: start_step and ramp_steps must be >= 0, "
                             f"got {self.start_step}, {self.ramp_steps}")

    @property
    def name(self) -> str:
        return self.objective.name

    @property
    def scheduled(self) -> bool:
        return self.start_step > 0 or self.ramp_steps > 0

    def weight_at(self, step) -> jax.Array | float:
        if not self.scheduled:
            return self.weight
        return weight_schedule(step, self.weight, self.start_step, self.ramp_steps)


class Combiner:
    """Weights, schedules or samples objectives (see the module docstring).

    terms: the `Term`s, names unique; mixing: 'sum' or 'sample'; task_ratios: {task: r >= 0}
    for 'sample' (a task missing from it gets ratio 1).
    """

    def __init__(self, terms: Sequence[Term], mixing: str = "sum",
                 task_ratios: dict | None = None):
        names = [t.name for t in terms]
        if not terms or len(set(names)) != len(names):
            raise ValueError(f"objectives must be non-empty with unique names, got {names}")
        if mixing not in MIXING:
            raise ValueError(f"method.mixing must be one of {MIXING}, got {mixing!r}")
        self.terms = tuple(terms)
        self.mixing = mixing
        self.tasks: tuple[str, ...] = tuple(dict.fromkeys(t.task or t.name for t in terms))
        ratios = dict(task_ratios or {})
        if mixing == "sample":
            bad = set(ratios) - set(self.tasks)
            if bad:
                raise ValueError(f"method.task_ratios names tasks {sorted(bad)} that no objective "
                                 f"belongs to (tasks: {self.tasks})")
            self.ratios = tuple(float(ratios.get(t, 1.0)) for t in self.tasks)
            if min(self.ratios) < 0 or sum(self.ratios) <= 0:
                raise ValueError(f"method.task_ratios must be >= 0 with a positive sum, "
                                 f"got {ratios}")
        elif ratios:
            raise ValueError("method.task_ratios is only read with method.mixing='sample'")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    def __getitem__(self, name: str) -> Term:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(name)

    def init_state(self, params) -> dict:
        return {t.name: t.objective.init_state(params) for t in self.terms}

    def prepare_batch(self, batch: dict, rng: jax.Array) -> dict:
        """Each objective's `prepare_batch` in order, each with its own key."""
        for i, t in enumerate(self.terms):
            batch = t.objective.prepare_batch(batch, jax.random.fold_in(rng, i))
        return batch

    def _run(self, indices, params, outputs, batch, rng, step, state, shared):
        total, metrics, state = jnp.zeros((), jnp.float32), {}, dict(state)
        if isinstance(outputs, LazyOutputs):
            outputs = outputs.fresh()
        for i in indices:
            t = self.terms[i]
            inp = ObjectiveInput(params=params, outputs=outputs, batch=batch,
                                 rng=jax.random.fold_in(rng, i), step=step,
                                 state=state.get(t.name, {}), shared=shared)
            loss, m, new = t.objective(inp)
            state[t.name] = new
            w = t.weight_at(step)
            total = total + w * loss
            metrics.update({f"{t.name}/{k}": v for k, v in m.items()})
            metrics[f"loss/{t.name}"] = loss
            if t.scheduled:
                metrics[f"weight/{t.name}"] = w
        return total, metrics, state

    def __call__(self, params, outputs: dict, batch: dict, rng: jax.Array, step,
                 state: dict | None = None, shared: Any = None) -> tuple[jax.Array, dict, dict]:
        """(loss [], metrics, new state {objective name: state})."""
        state = dict(state) if state is not None else {t.name: {} for t in self.terms}
        if self.mixing == "sum":
            return self._run(range(len(self.terms)), params, outputs, batch, rng, step, state,
                             shared)
        k_task, rng = jax.random.split(rng)
        groups = [[i for i, t in enumerate(self.terms) if (t.task or t.name) == task]
                  for task in self.tasks]
        fns = [lambda g=g: self._run(g, params, outputs, batch, rng, step, state, shared)
               for g in groups]
        union: dict[str, jax.ShapeDtypeStruct] = {}
        for fn in fns:
            for key, s in jax.eval_shape(fn)[1].items():
                if key in union and union[key].shape != s.shape:
                    raise ValueError(f"metric {key!r} has shape {s.shape} in one task and "
                                     f"{union[key].shape} in another")
                dtype = s.dtype if key not in union else jnp.result_type(union[key].dtype,
                                                                         s.dtype)
                union[key] = jax.ShapeDtypeStruct(s.shape, dtype)

        def branch(fn):
            def run():
                loss, metrics, new_state = fn()
                full = {k: jnp.asarray(metrics[k], s.dtype) if k in metrics
                        else jnp.zeros(s.shape, s.dtype) for k, s in union.items()}
                return jnp.asarray(loss, jnp.float32), full, new_state
            return run

        task = sample_task(k_task, self.ratios)
        loss, metrics, state = jax.lax.switch(task, [branch(fn) for fn in fns])
        return loss, dict(metrics, task_id=task), state


def parse_terms(section, build: Callable[[str, dict], Objective],
                defaults: dict | None = None) -> list[Term]:
    """Terms from `method.objectives`: {name: {type, weight, start_step, ramp_steps, task, ...}}.

    `build(type, fields)` makes the objective (its own fields: everything but the combiner's);
    `defaults` gives per-name defaults (e.g. a method's default weights) merged under the
    experiment file's entries. Unknown combiner fields are the objective builder's to reject.
    """
    terms = []
    for name, entry in dict(section).items():
        entry = dict(defaults.get(name, {}) if defaults else {}, **dict(entry or {}))
        kind = entry.pop("type", name)
        term_fields = {k: entry.pop(k) for k in ("weight", "start_step", "ramp_steps", "task")
                       if k in entry}
        obj = build(kind, dict(entry, name=name))
        terms.append(Term(obj, weight=float(term_fields.get("weight", 1.0)),
                          start_step=int(term_fields.get("start_step", 0)),
                          ramp_steps=int(term_fields.get("ramp_steps", 0)),
                          task=term_fields.get("task")))
    return terms


SCHEDULE_FIELDS = ("weight", "start_step", "ramp_steps", "task")


def override_terms(terms: Sequence[Term], section, where: str = "method.objectives"
                   ) -> list[Term]:
    """The method's default terms with the experiment file's `method.objectives` entries
    {name: {weight, start_step, ramp_steps, task}} applied; an unknown objective name or field
    raises (naming the valid ones). A term whose final weight is 0 and is not scheduled is
    dropped (not computed)."""
    section = dict(section or {})
    by_name = {t.name: t for t in terms}
    unknown = set(section) - set(by_name)
    if unknown:
        raise ValueError(f"{where} names objectives {sorted(unknown)} this method does not have; "
                         f"valid: {sorted(by_name)}")
    out = []
    for t in terms:
        entry = dict(section.get(t.name) or {})
        bad = set(entry) - set(SCHEDULE_FIELDS)
        if bad:
            raise ValueError(f"{where}.{t.name} has unknown fields {sorted(bad)}; valid: "
                             f"{list(SCHEDULE_FIELDS)}")
        t = dataclasses.replace(t, **{k: (v if k == "task" else type(getattr(t, k))(v))
                                      for k, v in entry.items()})
        if t.weight != 0 or t.scheduled:
            out.append(t)
    return out
