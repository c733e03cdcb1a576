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


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/experiment.py[:arg]` and returns its `get_config(arg)`."""
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"experiment file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(
        "vlp_experiment_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None) if arg else module.get_config()
