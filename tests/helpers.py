"""Shared test helpers: shrunk experiment configs, tiny model configs and batches, checkpoint
readers. Tests import these from here, never from each other's modules.

Sizes follow the suite's budget: width 32, one layer, 16-24 px; `on_devices(config, 1)` puts an
experiment on a one-device mesh (`mesh.num_devices=1`) for properties that are not about
sharding, so it compiles once instead of 8-way on a 2-core machine.
The shrunk experiment configs default to that; pass `num_devices=None` for all 8 devices.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp_jax.config_args import load_config
from vlp_jax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")

# A toy vocabulary for model-level tests (no tokenizer).
VOCAB = {"vocab_size": 50, "pad_id": 0}


def experiment_path(spec: str) -> str:
    """`experiments/<spec>` (a file name, optionally with `:arguments`)."""
    return os.path.join(EXPERIMENTS, spec)


def child_env(devices: int | None = None, **extra) -> dict:
    """The environment for a test's `python -m vlp_jax.cli ...` child: CPU only, `devices`
    simulated devices (None: unset), and this session's persistent compilation cache, so that a
    child compiling what an earlier child compiled reads it back instead (the preemption tests
    run the same training three times)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env


def on_devices(config: ml_collections.ConfigDict, num_devices: int | None = 1
               ) -> ml_collections.ConfigDict:
    """The experiment on a mesh over the first `num_devices` devices (None: all of them)."""
    if "mesh" not in config or config.mesh is None:
        config.mesh = ml_collections.ConfigDict()
    config.mesh.num_devices = num_devices
    return config


def tiny_dual_config(pool="cls", text_pool="eot", causal=True):
    """A width-32, one-layer dual encoder on 16 px images and 10 text tokens (VOCAB)."""
    return ml_collections.ConfigDict(dict(
        name="dual_encoder", embed_dim=24,
        image=dict(type="vit", patch_size=4, width=32, depth=1, num_heads=2, image_size=16,
                   pool=pool),
        text=dict(width=32, depth=1, num_heads=2, context_length=10, causal=causal,
                  pool=text_pool)))


def toy_tokens():
    """int32 [2, 10] token rows laid out bos ... eos pad ... (ids of VOCAB)."""
    return jnp.array([[2, 7, 8, 9, 3, 0, 0, 0, 0, 0],
                      [2, 5, 3, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)


def paired_batch(n=16, seed=0):
    """Images [n, 16, 16, 3] whose mean colour is tied to the first text token (tokens [n, 10]):
    a learnable pairing for the tiny dual encoder."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(5, 5 + n))
    image = np.broadcast_to(((ids - 5) / n * 2 - 1)[:, None, None, None], (n, 16, 16, 3))
    text = np.zeros((n, 10), np.int32)
    text[:, 0], text[:, 1], text[:, 2] = 2, ids, 3
    return dict(image=image.astype(np.float32) + 0.01 * rng.normal(size=(n, 16, 16, 3)),
                text=text)


def shrink_towers(config: ml_collections.ConfigDict, data_config) -> ml_collections.ConfigDict:
    """Width-32 one-layer towers (a width-16 ResNet for ResNet towers) sized to `data_config`."""
    res, length = data_config.image_size, data_config.text_length
    config.model.embed_dim = 32
    image = config.model.image
    if image.get("type", "vit") == "resnet":
        image.update(image_size=res, width=16, stage_sizes=[1, 1, 1], stem_stride=1)
    else:
        image.update(image_size=res, patch_size=res // 4, width=32, depth=1, num_heads=2,
                     mlp_dim=64)
    config.model.text.update(width=32, depth=1, num_heads=2, mlp_dim=64, context_length=length)
    return config


def _evaluate_on_validation(config, max_examples=128):
    for ev in config.evals.values():
        ev.split, ev.max_examples = "validation", max_examples
    return config


def tiny_clip_config(data_config, steps=40, num_devices: int | None = 1, **train):
    """experiments/clip_shapes.py shrunk to a width-32 model on the shared tiny dataset, on
    `num_devices` devices (None: all)."""
    config = on_devices(load_config(experiment_path("clip_shapes.py:smoke")), num_devices)
    config.data = data_config
    shrink_towers(config, data_config)
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 10
    config.train.update(dict(dict(batch_size=32, num_steps=steps, log_every=10,
                                  checkpoint_every=steps), **train))
    return _evaluate_on_validation(config)


def tiny_experiment(data_config, spec: str, steps: int, num_devices: int | None = 1):
    """`experiments/<spec>` (a file and its argument) with width-32 towers, batch 64, on the
    tiny dataset, on `num_devices` devices (None: all); the method section and the tower
    types are the experiment's."""
    config = on_devices(load_config(experiment_path(spec)), num_devices)
    config.data = data_config
    shrink_towers(config, data_config)
    config.optim.update(lr=3e-3, warmup_steps=10)
    config.train.update(batch_size=64, num_steps=steps, log_every=25, checkpoint_every=steps)
    return _evaluate_on_validation(config)


def tiny_experiment_config(data_config, spec: str, steps: int, **method):
    """`experiments/<spec>`'s method section and data flags on the tiny CLIP of
    `tiny_clip_config` (width 32, one layer, 24 px, batch 64), with `method` overrides."""
    experiment = load_config(experiment_path(spec))
    config = tiny_clip_config(data_config, steps=steps)
    config.train.batch_size = 64
    config.method = experiment.method
    config.method.update(method)
    for flag in ("two_views", "all_captions"):
        config.data[flag] = experiment.data.get(flag, False)
    return config


def single_cfg(**kw):
    """A width-32, two-layer ViLT/UNITER single-stream model config (16 px, 8 tokens)."""
    cfg = dict(name="single_stream", width=32, depth=2, num_heads=2, mlp_dim=64,
               image=dict(image_size=16, patch_size=4), text=dict(context_length=8),
               num_mrc_classes=5)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def albef_cfg(fusion="cross_attention", **kw):
    """A width-32 ALBEF config (one-layer towers, two fusion layers; 16 px, 8 tokens)."""
    cfg = dict(name="albef", embed_dim=24, fusion=fusion,
               image=dict(type="vit", patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64,
                          image_size=16, pool="cls"),
               text=dict(width=32, depth=1, fusion_depth=2, num_heads=2, mlp_dim=64,
                         context_length=8))
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def step_training_only(method, batch, trained: str, optim: dict):
    """One train step of `method` on `batch` with every parameter but the top-level `trained`
    frozen -> (|d loss / d trained| (the step's gradient norm), params before, params after).
    The step compiles without the towers' backward pass; for properties of one parameter
    (temperature clamps)."""
    from vlp_jax.parallel.mesh import to_global_batch
    from vlp_jax.parallel.sharding import DEFAULT_RULES
    from vlp_jax.train.optim import make_optimizer
    from vlp_jax.train.step import init_state, make_train_step, state_shardings
    frozen = [f"(?!{trained}$).*"]
    optim = ml_collections.ConfigDict(optim)
    tx, _, sh = state_shardings(method, lambda m: make_optimizer(optim, 10, m),
                                jax.random.key(0), batch, DEFAULT_RULES, frozen=frozen)
    state = init_state(method, tx, jax.random.key(0), batch, sh)
    before = jax.device_get(state.params)
    state, metrics = make_train_step(method, tx, sh, frozen=frozen)(
        state, to_global_batch(batch, method.mesh))
    return float(metrics["grad_norm"]), before, jax.device_get(state.params)


def restore_state(exp, workdir, step=None):
    """The TrainState of `workdir`'s latest checkpoint of Experiment `exp` (asserted to be at
    `step` if given), fetched to host memory."""
    ckpt = Checkpointer(os.path.join(str(workdir), "checkpoints"))
    if step is not None:
        assert ckpt.latest_step() == step
    state, _ = ckpt.restore(exp.restore_target())
    ckpt.close()
    return jax.device_get(state)


class InstrumentedIterator:
    """Wraps a TrainIterator: the batch of step `bad_step` (1-based; None: none) gets NaN
    images, and `states` counts `get_state` calls; everything else is the wrapped iterator's."""

    def __init__(self, inner, bad_step=None):
        self.inner, self.bad_step, self.step, self.states = inner, bad_step, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.step += 1
        if self.step == self.bad_step:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch

    def get_state(self):
        self.states += 1
        return self.inner.get_state()

    def __getattr__(self, name):        # set_state, issue_totals
        return getattr(self.inner, name)
