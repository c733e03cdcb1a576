"""SLIP: CLIP + SimCLR composed on the ContrastiveMethod, and that it learns on shapes."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.config_args import load_config
from vlp_jax.losses.simclr import nt_xent_loss
from vlp_jax.methods.registry import build_method
from vlp_jax.methods.slip import HEAD
from vlp_jax.methods.ssl_common import ProjectionMLP, image_features
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.train.metrics_log import read_metrics
from vlp_jax.train.trainer import train_and_evaluate
from tests.helpers import tiny_experiment_config

VOCAB = dict(vocab_size=50, pad_id=0, bos_id=1, eos_id=2, mask_id=3)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name="slip", **method):
    model = ml_collections.ConfigDict(dict(
        name="dual_encoder", embed_dim=16,
        image=dict(type="vit", patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32,
                   image_size=16),
        text=dict(width=16, depth=1, num_heads=2, mlp_dim=32, context_length=8)))
    return ml_collections.ConfigDict(dict(model=model, method=dict(name=name, **method)))


def _method(**method):
    return build_method(_config(**method), VOCAB, make_mesh())


def _batch(n=16, seed=0):
    r = np.random.default_rng(seed)
    text = np.zeros((n, 8), np.int32)
    text[:, 0], text[:, 1:4], text[:, 4] = 1, r.integers(4, 50, (n, 3)), 2
    image = r.uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32)
    return dict(image=jnp.asarray(image), text=jnp.asarray(text),
                image2=jnp.asarray(image + 0.1 * r.normal(size=image.shape).astype(np.float32)))


def _init(method, batch):
    return jax.jit(lambda k: nn.meta.unbox(method.init_params(k, batch)))(jax.random.key(0))


def test_loss_is_clip_plus_weighted_nt_xent_of_the_projected_views():
    batch = _batch()
    slip = _method(ssl_weight=0.5, ssl_temperature=0.2, ssl_mlp_dim=32, ssl_emb_dim=8)
    clip = build_method(_config(name="contrastive"), VOCAB, make_mesh())
    params = _init(slip, batch)
    loss, metrics, _ = jax.jit(slip.loss)(params, {}, batch, jax.random.key(1), jnp.array(0))
    clip_params = {k: v for k, v in params.items() if k != HEAD}
    clip_loss, _, _ = jax.jit(clip.loss)(clip_params, {}, batch, jax.random.key(1), jnp.array(0))
    np.testing.assert_allclose(metrics["loss/itc"], clip_loss, rtol=1e-5)
    assert set(params[HEAD]) == {"fc0", "ln0", "fc1", "ln1", "fc2"}   # a Flax-initialised head

    def project(images):
        pooled = image_features(slip.model, params, images)[1]
        return ProjectionMLP(32, 8).apply({"params": params[HEAD]}, pooled)

    ssl_ref, _ = nt_xent_loss(project(batch["image"]), project(batch["image2"]), 0.2)
    np.testing.assert_allclose(metrics["loss/ssl"], ssl_ref, rtol=1e-4)
    assert "ssl/ssl_acc" in metrics and "itc/itc_acc_i2t" in metrics
    np.testing.assert_allclose(loss, clip_loss + 0.5 * ssl_ref, rtol=1e-4)


def test_needs_the_second_view_and_rejects_accumulation():
    batch = _batch()
    slip = _method()
    params = _init(slip, batch)
    with pytest.raises(ValueError, match="two_views"):
        slip.loss(params, {}, {k: batch[k] for k in ("image", "text")}, jax.random.key(0), 0)
    with pytest.raises(ValueError, match="accumulation"):
        _method(accumulation="grad_cache", micro_batches=2)
    with pytest.raises(ValueError, match="ssl_weight"):
        _method(ssl_weight=-1.0)


@pytest.mark.slow
def test_slip_learns_far_above_chance(shapes_data_config, tmp_path):
    config = tiny_experiment_config(shapes_data_config, "slip_shapes.py:smoke", 150,
                                    ssl_mlp_dim=64, ssl_emb_dim=32)
    assert config.data.two_views and config.method.ssl_weight == 1.0
    result = train_and_evaluate(config, str(tmp_path), progress=False)
    rows = [r for r in read_metrics(str(tmp_path)) if "train/loss/ssl" in r]
    assert rows[-1]["train/loss/ssl"] < rows[0]["train/loss/ssl"]
    assert rows[-1]["train/loss/itc"] < rows[0]["train/loss/itc"]
    ev = result["eval"]
    print("SLIP eval", ev, "train", result["train"])
    assert ev["zeroshot/top1"] > 3 * ev["zeroshot/chance"], ev
    assert ev["retrieval/t2i_r10"] > 3 * 10 / 128 * 100, ev


def test_objectives_section_schedules_the_methods_terms_and_rejects_unknown_names():
    slip = _method(ssl_weight=0.5, objectives={"ssl": {"ramp_steps": 10, "start_step": 5}})
    ssl = slip.combiner["ssl"]
    assert (ssl.weight, ssl.start_step, ssl.ramp_steps) == (0.5, 5, 10)
    assert float(ssl.weight_at(jnp.int32(10))) == 0.25            # halfway up the ramp
    with pytest.raises(ValueError, match=r"valid: \['itc', 'ssl'\]"):
        _method(objectives={"mim": {"weight": 1.0}})
