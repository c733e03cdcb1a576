"""The method's prediction functions, jitted once for the evaluators.

`Predictor(method.predict_fns(), param_shardings, mesh)` jits each pure function
`fn(params, *inputs)` ONCE, with the parameters as an argument (not a closure: new parameters
never trigger a retrace) and explicit mesh shardings: parameters on their own shardings,
inputs split over the mesh's batch axes, outputs replicated (readable on every process).
`Predictor.bind(params)` returns the evaluators' `PredictFns`: {name: fn(*inputs)}, host
numpy inputs placed onto the batch sharding (every process passes the same full array).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlp_jax.parallel.mesh import batch_sharding, traced_on


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """A host array (identical on every process) or jax.Array -> global array on `sharding`."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class Predictor:
    """Named prediction functions jitted once; see the module docstring."""

    def __init__(self, fns: Mapping[str, Callable[..., Any]], param_shardings: Any, mesh: Mesh):
        self.mesh = mesh
        self.param_shardings = param_shardings
        self.input_sharding = batch_sharding(mesh)
        self._fns = dict(fns)
        self._jitted: dict[tuple[str, int], Callable] = {}

    def names(self) -> list[str]:
        return sorted(self._fns)

    def jitted(self, name: str, num_inputs: int) -> Callable:
        """jit(fn)(params, *inputs) with the shardings above; built once per (name, arity)."""
        key = (name, num_inputs)
        if key not in self._jitted:
            self._jitted[key] = jax.jit(
                traced_on(self.mesh, self._fns[name]),
                in_shardings=(self.param_shardings,) + (self.input_sharding,) * num_inputs,
                out_shardings=NamedSharding(self.mesh, P()))
        return self._jitted[key]

    def call(self, name: str, params: Any, *inputs: Any) -> jax.Array:
        placed = [place(x, self.input_sharding) for x in inputs]
        return self.jitted(name, len(placed))(params, *placed)

    def bind(self, params: Any) -> dict[str, Callable[..., jax.Array]]:
        """{name: fn(*inputs)} calling the jitted function with `params` (no compilation)."""
        return {name: functools.partial(self.call, name, params) for name in self._fns}
