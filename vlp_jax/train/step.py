"""Creating the sharded TrainState and the one jitted train step every method shares."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vlp_jax.methods.base import Method
from vlp_jax.parallel.mesh import batch_sharding
from vlp_jax.parallel.sharding import optimizer_shardings, param_shardings
from vlp_jax.train.state import TrainState, step_key

NONFINITE_POLICIES = ("skip", "stop", "ignore")


def state_shardings(method: Method, tx_builder: Callable[[Any], optax.GradientTransformation],
                    rng: jax.Array, example_batch: dict, rules
                    ) -> tuple[optax.GradientTransformation, TrainState, TrainState]:
    """Abstract TrainState and its shardings, without allocating any parameter.

    `tx_builder(trainable_mask_or_None)` makes the optimizer once the parameter tree is known.
    Returns (tx, abstract_state, state_shardings).
    """
    mesh = method.mesh
    boxed = jax.eval_shape(lambda k: method.init_params(k, example_batch), rng)
    p_sh = param_shardings(boxed, mesh, rules)
    abstract_params = nn.meta.unbox(boxed)
    tx = tx_builder(method.trainable(abstract_params))
    rep = NamedSharding(mesh, P())
    abstract_aux = jax.eval_shape(method.init_aux, abstract_params)
    shardings = TrainState(
        step=rep, params=p_sh,
        opt_state=optimizer_shardings(tx, abstract_params, p_sh, mesh),
        aux=method.aux_shardings(abstract_aux, p_sh), rng=rep, nonfinite=rep)
    abstract = jax.eval_shape(lambda k: _init_state(method, tx, k, example_batch), rng)
    return tx, abstract, shardings


def _init_state(method: Method, tx, rng: jax.Array, example_batch: dict) -> TrainState:
    init_rng, train_rng = jax.random.split(rng)
    params = nn.meta.unbox(method.init_params(init_rng, example_batch))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      aux=method.init_aux(params), rng=jax.random.key_data(train_rng),
                      nonfinite=jnp.zeros((), jnp.int32))


def init_state(method: Method, tx, rng: jax.Array, example_batch: dict,
               shardings: TrainState) -> TrainState:
    """Initialises the state directly into its shardings (no parameter is ever replicated first)."""
    return jax.jit(lambda k: _init_state(method, tx, k, example_batch),
                   out_shardings=shardings)(rng)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(method: Method, tx: optax.GradientTransformation, shardings: TrainState,
                    nonfinite: str = "skip", lr_schedule: Callable | None = None) -> Callable:
    """jit(train_step)(state, batch) -> (state, metrics), sharded in and out, state donated.

    Non-finite loss or gradients: 'skip' (and 'stop') keep the previous params, optimizer
    state and aux and count the skip in `state.nonfinite`; 'ignore' applies the update.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"train.nonfinite {nonfinite!r} is unknown; valid: {NONFINITE_POLICIES}")

    def train_step(state: TrainState, batch: dict):
        rng = step_key(state)

        (loss, (metrics, aux)), grads = method.value_and_grad(state.params, state.aux, batch, rng,
                                                              state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        aux = method.after_update(params, aux, state.step)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        new = (params, opt_state, aux)
        if nonfinite != "ignore":
            old = (state.params, state.opt_state, state.aux)
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        state = state.replace(step=state.step + 1, params=new[0], opt_state=new[1], aux=new[2],
                              nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       finite=finite.astype(jnp.float32), nonfinite_total=state.nonfinite)
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step - 1)
        return state, metrics

    rep = NamedSharding(method.mesh, P())
    return jax.jit(train_step, in_shardings=(shardings, batch_sharding(method.mesh)),
                   out_shardings=(shardings, rep), donate_argnums=(0,))
