"""Creating the sharded TrainState and the one jitted train step every method shares."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vlp_jax.methods.base import Method
from vlp_jax.parallel.mesh import batch_sharding, traced_on
from vlp_jax.parallel.sharding import optimizer_shardings, param_shardings
from vlp_jax.train.freeze import trainable_mask
from vlp_jax.train.state import TrainState, step_key
from vlp_jax.train.warm_start import apply_init

NONFINITE_POLICIES = ("skip", "stop", "ignore")


def example_shapes(batch: dict) -> dict:
    """Batch-1 abstract shapes of a batch (arrays or ShapeDtypeStructs, any batch size):
    {key: ShapeDtypeStruct([1, ...], dtype)}. Initialisation traces these, so its cost and
    memory do not depend on the global batch size."""
    return {k: jax.ShapeDtypeStruct((1,) + tuple(v.shape[1:]),
                                    jax.dtypes.canonicalize_dtype(v.dtype))
            for k, v in batch.items()}


def _zeros(shapes: dict) -> dict:
    """Zero arrays of `example_shapes` (created inside the traced init: constants, batch 1)."""
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}


def _split_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    init_rng, train_rng = jax.random.split(rng)
    return init_rng, train_rng


def state_shardings(method: Method, tx_builder: Callable[[Any], optax.GradientTransformation],
                    rng: jax.Array, example_batch: dict, rules, frozen: Sequence[str] = ()
                    ) -> tuple[optax.GradientTransformation, TrainState, TrainState]:
    """Abstract TrainState and its shardings, without allocating any parameter.

    `example_batch`: any batch (arrays or ShapeDtypeStructs; only the per-example shapes
    and dtypes are used: initialisation traces batch-1 shapes). `frozen`: `config.frozen`
    regexes. `tx_builder(trainable_mask_or_None)` makes the optimizer once the parameter tree
    is known. Returns (tx, abstract_state, state_shardings).
    """
    mesh = method.mesh
    shapes = example_shapes(example_batch)
    boxed = jax.eval_shape(lambda k: method.init_params(_split_rng(k)[0], _zeros(shapes)), rng)
    p_sh = param_shardings(boxed, mesh, rules)
    abstract_params = nn.meta.unbox(boxed)
    tx = tx_builder(trainable_mask(abstract_params, frozen))
    rep = NamedSharding(mesh, P())
    abstract_aux = jax.eval_shape(method.init_aux, abstract_params)
    shardings = TrainState(
        step=rep, params=p_sh,
        opt_state=optimizer_shardings(tx, abstract_params, p_sh, mesh),
        aux=method.aux_shardings(abstract_aux, p_sh), rng=rep, nonfinite=rep)
    abstract = jax.eval_shape(
        lambda p, k: _state_from_params(method, tx, p, k), abstract_params, rng)
    return tx, abstract, shardings


def _state_from_params(method: Method, tx, params, rng: jax.Array) -> TrainState:
    _, train_rng = _split_rng(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      aux=method.init_aux(params), rng=jax.random.key_data(train_rng),
                      nonfinite=jnp.zeros((), jnp.int32))


def init_params(method: Method, rng: jax.Array, example_batch: dict, param_shardings_tree):
    """Fresh parameters (unboxed) initialised directly into their shardings from batch-1
    shapes; `rng` is the experiment's seed key (split as `init_state` does)."""
    shapes = example_shapes(example_batch)
    return jax.jit(lambda k: nn.meta.unbox(method.init_params(_split_rng(k)[0], _zeros(shapes))),
                   out_shardings=param_shardings_tree,
                   compiler_options=_run_once_options(method.mesh))(rng)


def _run_once_options(mesh) -> dict | None:
    """XLA options for a computation that runs once per job (initialisation): on CPU, backend
    optimisation level 0, which halves the compile time of the ~100 random initialisers
    (measured: ViLT's tiny init compiles in 1.4 s instead of 2.9) and costs nothing that matters for one run.
    Other platforms compile as usual."""
    if mesh.devices.flat[0].platform == "cpu":
        return {"xla_backend_optimization_level": 0}
    return None


def init_state(method: Method, tx, rng: jax.Array, example_batch: dict,
               shardings: TrainState, init: Any = None) -> TrainState:
    """Initialises the state directly into its shardings (no parameter is ever replicated).

    Order: fresh parameters (traced from batch-1 shapes) -> `config.init` subtrees read from
    a checkpoint on the host and placed onto the parameters' shardings (outside any trace) ->
    optimizer state and method aux (EMA teachers) computed from those final parameters.
    """
    params = init_params(method, rng, example_batch, shardings.params)
    params = apply_init(params, init, shardings.params)
    return jax.jit(lambda p, k: _state_from_params(method, tx, p, k), out_shardings=shardings,
                   donate_argnums=(0,), compiler_options=_run_once_options(method.mesh))(
                       params, rng)


def make_train_step(method: Method, tx: optax.GradientTransformation, shardings: TrainState,
                    nonfinite: str = "skip", lr_schedule: Callable | None = None,
                    frozen: Sequence[str] = (), stop_baseline: int | None = None) -> Callable:
    """jit(train_step)(state, batch) -> (state, metrics), sharded in and out, state donated.

    One step: grads -> (frozen grads := 0) -> optimizer update -> `apply_updates` ->
    `method.project_params` -> `method.after_update` (EMA teachers).
    `frozen`: `config.frozen` regexes (the same as given to `state_shardings`): their
    gradients are replaced by zeros, so XLA drops their computation and they count in neither
    the clipping norm nor the finiteness check.
    Non-finite loss or gradients: 'skip' (and 'stop') keep the previous params, optimizer
    state and aux and count the skip in `state.nonfinite`; 'ignore' applies the update.
    'stop' with `stop_baseline` (the run's `state.nonfinite` at its start): once a step was
    non-finite (`state.nonfinite > stop_baseline`) no later step applies its update either,
    so the state keeps the last good parameters until the host, which checks only at log
    steps, stops the run. `metrics['finite']` is the step's own finiteness: the loss and the
    global gradient norm are finite (an inf or NaN anywhere in the gradients makes the norm
    non-finite; so does a norm beyond float32's range, a step as useless).
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"train.nonfinite {nonfinite!r} is unknown; valid: {NONFINITE_POLICIES}")
    mask = trainable_mask(shardings.params, frozen)

    def train_step(state: TrainState, batch: dict):
        rng = step_key(state)

        (loss, (metrics, aux)), grads = method.value_and_grad(state.params, state.aux, batch, rng,
                                                              state.step)
        if mask is not None:
            grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, mask)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = method.project_params(optax.apply_updates(state.params, updates))
            return params, opt_state, method.after_update(params, aux, state.step)

        apply = finite
        if nonfinite == "stop" and stop_baseline is not None:
            apply = finite & (state.nonfinite <= stop_baseline)
        if nonfinite == "ignore":
            new = update(None)
        else:
            # One conditional rather than a select per leaf of (params, opt_state, aux): the
            # skipped step computes nothing, and XLA compiles no per-leaf selects (those
            # doubled the step's compile time on CPU).
            new = jax.lax.cond(apply, update,
                               lambda _: (state.params, state.opt_state, state.aux), None)
        skipped = ~apply if nonfinite != "ignore" else ~finite
        state = state.replace(step=state.step + 1, params=new[0], opt_state=new[1], aux=new[2],
                              nonfinite=state.nonfinite + skipped.astype(jnp.int32))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                       finite=finite.astype(jnp.float32), nonfinite_total=state.nonfinite)
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step - 1)
        return state, metrics

    rep = NamedSharding(method.mesh, P())
    return jax.jit(traced_on(method.mesh, train_step),
                   in_shardings=(shardings, batch_sharding(method.mesh)),
                   out_shardings=(shardings, rep), donate_argnums=(0,))
