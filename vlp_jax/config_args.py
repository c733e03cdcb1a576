"""Short string arguments for experiment files, big_vision style: `file.py:res=32,smoke`."""
from __future__ import annotations

import ml_collections


def _convert(text: str, default):
    if isinstance(default, bool):
        if text.lower() in ("", "true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if default is None:
        return text
    return type(default)(text)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses 'a=1,b,c=x' against `defaults` (their types convert the values).

    A bare name sets a boolean to True. Unknown names raise ValueError listing the valid ones.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown experiment argument {key!r}; valid: {sorted(defaults)}")
        out[key] = _convert(value.strip() if "=" in item else "true", defaults[key])
    return ml_collections.ConfigDict(out)


def load_module(path: str):
    """Imports an experiment file as a module (FileNotFoundError naming it when absent)."""
    import importlib.util
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"experiment file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(
        "vlp_experiment_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def sibling(file: str, name: str = "common.py"):
    """The module `name` beside experiment file `file` (experiment files are loaded by path,
    not as a package): `common = sibling(__file__)` gives experiments/common.py."""
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.abspath(file)), name)
    key = "vlp_experiment_" + os.path.splitext(name)[0] + "_" + str(abs(hash(path)))
    if key not in sys.modules:
        sys.modules[key] = load_module(path)
    return sys.modules[key]


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/experiment.py[:arg]` and returns its `get_config(arg)` (as written: call
    `vlp_jax.config_schema.resolve` for the checked tree with defaults filled in)."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"experiment file {path!r} defines no get_config(arg=None)")
    return module.get_config(arg or None) if arg else module.get_config()


# ----------------------------------------------------------------------------- overrides

def _leaf_type(node, leaf: str):
    """The declared Python type of node[leaf] (a typed placeholder's type when it is None)."""
    ref = node._fields.get(leaf) if hasattr(node, "_fields") else None
    if isinstance(ref, ml_collections.FieldReference):
        return ref.get_type()
    value = node[leaf]
    return None if value is None else type(value)


def convert_value(text: str, kind, dotted: str):
    """A command-line string -> a value of type `kind` (bool/int/float/str, or a Python literal
    for tuples, lists, mappings and untyped fields). Raises ConfigError naming the key."""
    import ast

    from vlp_jax.config_schema import ConfigError
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if text.strip() in ("None", "none", "null"):
            return None
        value = ast.literal_eval(text)
        if kind in (tuple, list) and isinstance(value, (tuple, list)):
            return kind(value)
        return value
    except (ValueError, SyntaxError) as e:
        want = getattr(kind, "__name__", "a Python literal") if kind else "a Python literal"
        raise ConfigError(f"bad value for --config.{dotted}: {text!r} is not {want} "
                          f"({e})") from None


def parse_overrides(config: ml_collections.ConfigDict, items) -> dict:
    """[(dotted key, text)] -> {dotted key: typed value}, checked against `config` with its
    declared defaults filled in (so any declared key may be overridden). An unknown key raises
    ConfigError naming the nearest valid key."""
    import difflib

    from vlp_jax.config_schema import ConfigError, flatten, resolve
    resolved = resolve(config)
    known = flatten(resolved)
    out = {}
    for dotted, text in items:
        node, parts = resolved, dotted.split(".")
        for i, key in enumerate(parts[:-1]):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                node = None
                break
            node = node[key]
        leaf = parts[-1]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node or isinstance(
                node[leaf], ml_collections.ConfigDict):
            close = difflib.get_close_matches(dotted, list(known), n=1)
            hint = f"; did you mean --config.{close[0]}?" if close else ""
            raise ConfigError(f"unknown override --config.{dotted}{hint}")
        out[dotted] = convert_value(text, _leaf_type(node, leaf), dotted)
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted fields in place (`{'train.num_steps': 10}`), creating missing sections; a
    field linked to another (FieldReference) updates both, as ml_collections does."""
    with config.unlocked():
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = config
            for key in parents:
                if key not in node or node[key] is None:
                    node[key] = ml_collections.ConfigDict()
                node = node[key]
            node[leaf] = value
    return config
