"""Bad configs fail before any compilation, with the field and the valid values named; the
declared fields (`vlp_jax.config_schema`) cover every experiment and every key the code reads,
with the defaults the code uses."""
import ast
import os

import ml_collections
import pytest

from vlp_jax import config_schema as schema
from vlp_jax.config_args import load_config, parse_arg
from vlp_jax.config_schema import ConfigError, resolve
from vlp_jax.methods.registry import build_method
from vlp_jax.parallel.mesh import make_mesh
from vlp_jax.train.trainer import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = {"vocab_size": 64, "pad_id": 0}


def _config(name="clip_shapes.py"):
    return load_config(os.path.join(ROOT, "experiments", name) + ":smoke")


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
                     if f.endswith(".py") and not f.startswith("_") and f != "common.py")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_file_validates_and_builds_its_method(name):
    """Each recipe's full and :smoke configs resolve against the declared fields, pass
    validation, and its method builds (a typo in an experiment file fails here, not minutes
    into a run)."""
    mesh, vocab = make_mesh(), dict(vocab_size=64, pad_id=0, bos_id=1, eos_id=2, mask_id=3)
    for arg in ("", ":smoke"):
        config = resolve(load_config(os.path.join(ROOT, "experiments", name) + arg))
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


# ----------------------------------------------------------------------------- the schema

def _set(config, dotted, value):
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    with node.unlocked():
        node[leaf] = value


@pytest.mark.parametrize("name,dotted,value,match", [
    ("clip_shapes.py", "train.bach_size", 3,
     r"unknown config key train.bach_size in section 'train'; did you mean train.batch_size\?"),
    ("clip_shapes.py", "sed", 1, r"unknown config key sed in the top level; did you mean seed\?"),
    ("clip_shapes.py", "model.image.widht", 3, r"model.image.widht in section 'model.image' "
     r"\(model.image.type='vit'\); did you mean model.image.width\?"),
    ("clip_shapes.py", "evals.zeroshot.kss", (1,), r"did you mean evals.zeroshot.ks\?"),
    ("clip_shapes.py", "optim.warmup", 3, r"did you mean optim.warmup_steps\?"),
    ("clip_shapes.py", "data.two_view", True, r"did you mean data.two_views\?"),
    ("clip_shapes.py", "mesh.num_device", 1, r"did you mean mesh.num_devices\?"),
    ("albef_shapes.py", "method.queue", 8, r"\(method.name='albef'\); did you mean "
                                           r"method.queue_size\?"),
    ("albef_shapes.py", "model.text.fusion_dept", 1, r"did you mean model.text.fusion_depth\?"),
    ("vilt_shapes.py", "method.start_step", {}, r"did you mean method.start_steps\?"),
    # a key of another method is unknown to this one
    ("clip_shapes.py", "method.ssl_weight", 1.0, r"method.ssl_weight in section 'method' "
                                                 r"\(method.name='contrastive'\); valid keys:"),
    ("clip_shapes.py", "method.warm_start", {}, r"method.warm_start was replaced by the "
                                                r"top-level config.init"),
])
def test_unknown_keys_name_the_section_and_the_nearest_key(name, dotted, value, match):
    config = _config(name)
    _set(config, dotted, value)
    with pytest.raises(ConfigError, match=match):
        resolve(config)


@pytest.mark.parametrize("dotted,value,match", [
    ("model.remat", 1, "config key model.remat must be bool, got int 1"),
    ("train.num_steps", 2.5, "config key train.num_steps must be int, got float 2.5"),
    ("optim.lr", "big", "config key optim.lr must be float, got str 'big'"),
    ("frozen", "logit_scale", "config key frozen must be list of str"),
    ("train.nonfinite", "skp", r"train.nonfinite='skp' is not valid; valid: \['skip'"),
    ("model.name", "dual", r"model.name 'dual' is unknown; valid: \['albef', 'coca', 'dual_encoder', "),
    ("model.image.type", "cnn", r"model.image.type 'cnn' is unknown; valid: \['resnet', 'vit'\]"),
    ("evals.zeroshot.type", "zeroshot", r"evals.zeroshot.type 'zeroshot' is unknown; valid: "),
    ("method.loss", "hinge", r"method.loss='hinge' is not valid; valid: \['softmax', 'sigmoid'\]"),
])
def test_wrong_types_and_names_fail_naming_the_field(dotted, value, match):
    tree = _config().to_dict()          # set in a plain dict: ConfigDict checks types itself
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node[key]
    node[leaf] = value
    config = ml_collections.ConfigDict(tree)
    with pytest.raises(ConfigError, match=match):
        resolve(config)


def test_required_fields_and_sections():
    config = _config()
    del config.train["batch_size"]
    with pytest.raises(ConfigError, match="config key train.batch_size is required"):
        resolve(config)
    config = _config()
    del config["model"]
    with pytest.raises(ConfigError, match="config section model is required"):
        resolve(config)


def test_resolve_fills_defaults_and_leaves_the_input_alone():
    config = _config()
    config.lock()
    before = config.to_dict()
    resolved = resolve(config)
    assert config.to_dict() == before and "preemption_check_every" not in config.train
    assert resolved.is_locked
    assert resolved.train.preemption_check_every == 10
    assert resolved.method.micro_batches == 1 and resolved.method.accumulation == "none"
    assert resolved.model.remat_policy == "nothing_saveable"
    assert resolved.init.workdir == "" and list(resolved.frozen) == []
    assert resolved.evals.zeroshot.ks == (1, 5) and resolved.evals.zeroshot.log_steps is None
    assert resolved.mesh.num_devices is None
    # links survive the copy: data.text_length still drives model.text.context_length
    resolved.data.text_length = 20
    assert resolved.model.text.context_length == 20 and config.model.text.context_length == 28
    # derived default: mlp_dim = 4 * width
    config.unlock()
    del config.model.image["mlp_dim"]
    assert resolve(config).model.image.mlp_dim == 4 * config.model.image.width
    # resolving twice changes nothing
    assert schema.tree_lines(resolve(resolved)) == schema.tree_lines(resolved)


def test_absent_optional_sections_are_created_with_defaults():
    config = _config()
    del config["mesh"], config["evals"]
    resolved = resolve(config)
    assert dict(resolved.mesh.axes) == {"data": -1} and len(resolved.evals) == 0


def test_named_subsections_each_checked_by_their_own_declaration():
    """An `Each` mapping (as method.objectives will be): entries chosen by `type`, or by their
    entry name when the family allows it; common fields filled in every entry."""
    schema.declare("_test_objective", None, weight=schema.Field(float, 1.0))
    schema.declare("_test_objective", "itc", temperature=schema.Field(float, 0.07))
    schema.declare("_test_objective", "mlm", mask_prob=schema.Field(float, 0.15))
    schema.declare("_test_method", None,
                   objectives=schema.Each("_test_objective", key="type", key_from_entry=True))
    section = ml_collections.ConfigDict(dict(objectives=dict(
        itc=dict(weight=2.0), masked=dict(type="mlm", mask_prob=0.3))))
    out = schema.resolve_section("_test_method", section, path="method")
    assert out.objectives.itc.to_dict() == {"weight": 2.0, "temperature": 0.07}
    assert out.objectives.masked.to_dict() == {"type": "mlm", "mask_prob": 0.3, "weight": 1.0}
    section.objectives.itc.temprature = 0.1
    with pytest.raises(ConfigError, match=r"method.objectives.itc.temprature .*did you mean "
                                          r"method.objectives.itc.temperature\?"):
        schema.resolve_section("_test_method", section, path="method")
    bad = ml_collections.ConfigDict(dict(objectives=dict(itm=dict(weight=1.0))))
    with pytest.raises(ConfigError, match=r"method.objectives.itm.type 'itm' is unknown; "
                                          r"valid: \['itc', 'mlm'\]"):
        schema.resolve_section("_test_method", bad, path="method")


def test_declares_decorator_and_extends():
    @schema.declares("_test_model", "base", width=schema.Field(int, 8))
    def build(cfg):
        return cfg
    schema.declare("_test_model", "wide", extends="base", depth=schema.Field(int, 2))
    assert build("x") == "x"
    assert set(schema.fields_of("_test_model", "wide")) == {"width", "depth"}
    with pytest.raises(TypeError, match="must be a Field"):
        schema.declare("_test_model", "bad", width=8)


# ---------------------------------------------------- the declarations match the read sites

READERS = ("cfg", "config", "tcfg", "text", "data_config", "mesh_cfg", "init_cfg", "method",
           "model", "image")


def _literal_gets():
    """(file, line, key, default) of every `<config>.get('key', <literal>)` in vlp_jax/."""
    for folder, _, files in os.walk(os.path.join(ROOT, "vlp_jax")):
        for f in files:
            if not f.endswith(".py") or f in ("config_schema.py", "fields.py"):
                continue
            path = os.path.join(folder, f)
            with open(path) as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "get" and len(node.args) == 2
                        and isinstance(node.args[0], ast.Constant)
                        and isinstance(node.args[0].value, str)):
                    continue
                receiver = ast.unparse(node.func.value)
                if receiver.split(".")[-1] not in READERS:
                    continue
                try:
                    default = ast.literal_eval(node.args[1])
                except ValueError:
                    continue           # computed fallbacks (4 * width, module constants)
                yield os.path.relpath(path, ROOT), node.lineno, node.args[0].value, default


def test_every_config_key_the_code_reads_is_declared_with_the_code_default():
    """A `.get(key, default)` left at a read site must name a declared key whose declared
    default is the same (so resolving a config changes no behaviour)."""
    by_key = {}
    for family, name, key, spec in schema.declared():
        if isinstance(spec, schema.Field):
            by_key.setdefault(key, []).append(spec.default)
        else:
            by_key.setdefault(key, []).append(schema.OMIT)
        if isinstance(spec, (schema.Select, schema.Each)):      # the selecting key itself
            by_key.setdefault(spec.key, []).append(getattr(spec, "default", schema.REQUIRED))
    problems = []
    for path, line, key, default in _literal_gets():
        if key not in by_key:
            problems.append(f"{path}:{line}: {key!r} is read but not declared")
            continue
        defaults = by_key[key]
        if default is None or schema.REQUIRED in defaults:
            continue     # `.get(key, None) or <fallback>`, or a key resolve requires anyway
        if not any(_same(d, default) for d in defaults):
            problems.append(f"{path}:{line}: {key!r} defaults to {default!r} here, declared "
                            f"{defaults}")
    assert not problems, "\n".join(problems)


def _same(declared, code) -> bool:
    if isinstance(declared, schema.Derived) or declared is schema.OMIT:
        return True
    if isinstance(declared, (tuple, list)) and isinstance(code, (tuple, list)):
        return tuple(declared) == tuple(code)
    if isinstance(declared, bool) or isinstance(code, bool):
        return declared is code
    return declared == code


def test_reference_lists_every_declared_family():
    text = schema.reference()
    assert "| batch_size | int | (required) |" in text
    assert "### method = 'slip' (extends 'contrastive')" in text
    families = {f for f, _, _, _ in schema.declared() if not f.startswith("_")}
    assert all(f"### {f}" in text for f in families)
