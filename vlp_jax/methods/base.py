"""The interface every method implements to plug into `vlp_jax.train.trainer`.

A method owns a Flax model and turns (params, aux, batch, rng, step) into a scalar loss.
All functions are pure and traced inside the trainer's one jitted step:

    init_params(rng, batch)            -> boxed params (logical axis annotations kept)
    init_aux(params)                   -> aux pytree: EMA teachers, queues ({} by default)
    loss(params, aux, batch, rng, step) -> (loss [], metrics {name: []}, new aux)
    value_and_grad(params, aux, batch, rng, step) -> ((loss, (metrics, aux)), grads)
    after_update(params, aux, step)    -> aux after the optimizer step (EMA updates)
    trainable(params)                  -> bool tree (False = frozen) or None (all trained)
    encoders(params)                   -> Encoders used by the evaluators
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Encoders:
    """Jitted, parameter-bound functions the evaluators call.

    encode_image: images [B, H, W, 3] -> unit-norm embeddings [B, D].
    encode_text: tokens [B, L] -> unit-norm embeddings [B, D].
    score_pairs: optional, fusion models only: (images [B, H, W, 3], tokens [B, L]) -> [B]
      match scores of the aligned pairs (e.g. the ITM head's positive logit), used for
      re-ranking retrieval and compositional evaluation.
    """

    encode_image: Callable[[Any], jax.Array]
    encode_text: Callable[[Any], jax.Array]
    score_pairs: Callable[[Any, Any], jax.Array] | None = None


@dataclasses.dataclass
class Method:
    model: nn.Module
    mesh: Mesh
    config: ml_collections.ConfigDict   # the `method` section of the experiment
    vocab: dict = dataclasses.field(default_factory=dict)   # tokenizer ids (pad, mask, ...)

    def init_params(self, rng: jax.Array, batch: dict) -> Any:
        return self.model.init(rng, batch["image"], batch["text"])["params"]

    def init_aux(self, params) -> Any:
        return {}

    def aux_shardings(self, abstract_aux, param_shardings) -> Any:
        """Default: every aux array replicated. EMA teachers override to follow params."""
        return jax.tree.map(lambda _: NamedSharding(self.mesh, P()), abstract_aux)

    def loss(self, params, aux, batch, rng, step):
        raise NotImplementedError

    def value_and_grad(self, params, aux, batch, rng, step):
        """((loss, (metrics, new_aux)), grads). Default: autodiff of `loss`; methods that
        compute gradients another way (GradCache) override this."""
        def loss_fn(p):
            loss, metrics, new_aux = self.loss(p, aux, batch, rng, step)
            return loss, (metrics, new_aux)
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def after_update(self, params, aux, step):
        return aux

    def trainable(self, params) -> Any | None:
        return None

    def encoders(self, params) -> Encoders:
        variables = {"params": params}
        return Encoders(
            encode_image=jax.jit(lambda x: self.model.apply(variables, x, method="encode_image")),
            encode_text=jax.jit(lambda t: self.model.apply(variables, t, method="encode_text")))
