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


EXPERIMENTS = sorted(f for f in os.listdir(os.path.join(ROOT, "experiments"))
                     if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_file_validates_and_builds_its_method(name):
    """Each recipe's full and :smoke configs pass validation, and its method builds (a typo in
    an experiment file fails here, not minutes into a run)."""
    mesh, vocab = make_mesh(), dict(vocab_size=64, pad_id=0, bos_id=1, eos_id=2, mask_id=3)
    for arg in ("", ":smoke"):
        config = load_config(os.path.join(ROOT, "experiments", name) + arg)
        validate_config(config, mesh)
        build_method(config, vocab, mesh)


def test_vilt_itm_warmup_argument():
    path = os.path.join(ROOT, "experiments", "vilt_shapes.py")
    assert dict(load_config(path + ":steps=1000").method.start_steps) == {"mlm": 450}
    assert dict(load_config(path + ":itm_warmup=0").method.start_steps) == {}
    assert dict(load_config(path + ":variant=uniter").method.start_steps) == {}
    uniter = load_config(path + ":variant=uniter,itm_warmup=0.5,steps=100").method.start_steps
    assert dict(uniter) == {"mlm": 50, "mrfr": 50, "mrc_kl": 50}
    with pytest.raises(ValueError, match=r"itm_warmup must be in \[0, 1\)"):
        load_config(path + ":itm_warmup=1.5")
    with pytest.raises(ValueError, match="needs 'itm'"):
        load_config(path + ":variant=vlbert,itm_warmup=0.5")
