"""The interface every method implements to plug into `vlp_jax.train.trainer`.

A method owns a Flax model and turns (params, aux, batch, rng, step) into a scalar loss.
All functions are pure and traced inside the trainer's one jitted step:

    init_params(rng, batch)            -> boxed params (logical axis annotations kept);
                                          `batch` holds zero arrays of batch size 1 (the
                                          trainer traces batch-1 shapes): never depend on
                                          its batch size or values
    init_aux(params)                   -> aux pytree: EMA teachers, queues ({} by default)
    loss(params, aux, batch, rng, step) -> (loss [], metrics {name: []}, new aux)
    value_and_grad(params, aux, batch, rng, step) -> ((loss, (metrics, aux)), grads)
    after_update(params, aux, step)    -> aux after the optimizer step (EMA updates)
    project_params(params)             -> params after `optax.apply_updates` (default
                                          identity; e.g. clamping a temperature into its
                                          bounds after the update, as open_clip / ALBEF do)
    predict_fns()                      -> {name: pure fn(params, *inputs)} for the evaluators

Freezing (`config.frozen`) and initialising parameters from a checkpoint (`config.init`)
are the trainer's, for every method alike (`vlp_jax.train.freeze`, `vlp_jax.train.warm_start`):
frozen parameters' gradients are zeroed in the train step (so XLA drops their computation),
and `init_aux` sees the parameters after the checkpoint's subtrees were copied in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


PREPARE_SALT = 0x5EED   # fold_in salt of prepare_batch's key


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

    @staticmethod
    def prepare_key(rng: jax.Array) -> jax.Array:
        """The key `value_and_grad` gives `prepare_batch` (derived from the step key)."""
        return jax.random.fold_in(rng, PREPARE_SALT)

    def prepare_batch(self, batch: dict, rng: jax.Array) -> dict:
        """Random choices of inputs (masks, a caption per image), drawn once per step before
        differentiation. Default: the batch as it is."""
        return batch

    def value_and_grad(self, params, aux, batch, rng, step):
        """((loss, (metrics, new_aux)), grads). Default: `prepare_batch`, then autodiff of
        `loss`; methods that compute gradients another way (GradCache) override this."""
        batch = self.prepare_batch(batch, self.prepare_key(rng))

        def loss_fn(p):
            loss, metrics, new_aux = self.loss(p, aux, batch, rng, step)
            return loss, (metrics, new_aux)
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def after_update(self, params, aux, step):
        return aux

    def project_params(self, params):
        """params -> params, applied inside the train step right after the optimizer update
        (a projection onto the feasible set, e.g. a clamped temperature). Default: identity."""
        return params

    def predict_fns(self) -> dict[str, Callable[..., jax.Array]]:
        """Named pure prediction functions, parameters first (not bound, not jitted: the
        trainer jits each once with the parameters as an argument and mesh shardings):

          encode_image(params, images [B, H, W, 3]) -> unit-norm embeddings [B, D]
          encode_text(params, tokens int32 [B, L])  -> unit-norm embeddings [B, D]

        Fusion models add `score_pairs(params, images [B, H, W, 3], tokens [B, L]) -> [B]`,
        the match score of the aligned pairs (e.g. the ITM head's logit margin).
        """
        return {name: model_predict_fn(self.model, name)
                for name in ("encode_image", "encode_text")}


def model_predict_fn(model: nn.Module, name: str) -> Callable[..., jax.Array]:
    """fn(params, *inputs) = model.apply({'params': params}, *inputs, method=name)."""
    def predict(params, *inputs):
        return model.apply({"params": params}, *inputs, method=name)
    predict.__name__ = name
    return predict
