"""Bad configs fail before any compilation, with the field and the valid values named."""
import os

import ml_collections
import pytest

from vlp_jax.config_args import load_config, parse_arg
from vlp_jax.methods.registry import build_method
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.train.trainer import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = {"vocab_size": 64, "pad_id": 0}


def _config():
    return load_config(os.path.join(ROOT, "experiments", "clip_shapes.py") + ":smoke")


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.train.update({"batch_size": 12}), r"train.batch_size=12 must be a positive "
                                                   r"multiple of the data-parallel size 8"),
    (lambda c: c.train.update({"num_steps": 0}), "train.num_steps must be positive"),
    (lambda c: c.model.image.update({"image_size": 48}),
     "model.image.image_size=48 contradicts data.image_size=32"),
    (lambda c: c.method.update({"accumulation": "grad_cache", "micro_batches": 3}),
     "method.micro_batches=3 must divide the per-device batch"),
])
def test_invalid_fields_are_named(mutate, match):
    config = _config()
    mutate(config)
    with pytest.raises(ValueError, match=match):
        validate_config(config, make_mesh())


def test_mesh_larger_than_device_count():
    with pytest.raises(ValueError, match="needs 16 devices, but 8 are available"):
        make_mesh(ml_collections.ConfigDict({"axes": {"data": 16}}))


@pytest.mark.parametrize("section,field,value,match", [
    ("method", "name", "clipp", r"method.name 'clipp' is unknown; valid: \["),
    ("method", "loss", "hinge", r"method.loss 'hinge' is unknown; valid: \('softmax', 'sigmoid'\)"),
    ("model", "name", "transformer", "model.name 'transformer' is unknown"),
])
def test_unknown_names_list_valid_values(section, field, value, match):
    config = _config()
    config[section][field] = value
    with pytest.raises(ValueError, match=match):
        build_method(config, VOCAB, make_mesh())


def test_sigmoid_loss_without_bias_is_contradictory():
    config = _config()
    config.method.loss = "sigmoid"
    with pytest.raises(ValueError, match="needs model.logit_bias_init"):
        build_method(config, VOCAB, make_mesh())


def test_experiment_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown experiment argument 'smok'"):
        parse_arg("smok", smoke=False)
    assert parse_arg("smoke,steps=5", smoke=False, steps=0).to_dict() == {"smoke": True,
                                                                          "steps": 5}
