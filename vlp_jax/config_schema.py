"""Declared config fields: every section's keys, types and defaults in one place.

`resolve(config)` checks a whole experiment config before anything is built or compiled and
returns a copy with every default filled in, so read sites can write `cfg.key` instead of
`cfg.get(key, default)`:

  - an unknown or misspelt key raises `ConfigError` naming the section, the key and the
    nearest valid key (`train.bach_size` -> "did you mean train.batch_size?");
  - a value of the wrong type raises naming the field, its declared type and the value;
  - a section chosen by name (`model.name`, `method.name`, `optim.name`, `data.name`,
    `model.image.type`, `evals.<x>.type`) is checked against the declaration of that name;
    an unknown name raises listing the valid ones.

The input is not modified (FieldReferences inside it, e.g. `model.text.context_length`
linked to `data.text_length`, stay linked in the copy). The trainer resolves every config
(`Experiment`), the CLI resolves after applying `--config.a.b=v` overrides. Functions that take
one section call `resolve_part('optim', cfg)` (or `resolve_entry('evals', name, cfg)` for one
evaluator) on entry, so they can be called with a partial section and still read `cfg.key`.
A key that moved is registered with `moved('method.frozen', 'the top-level config.frozen')`
and named in the error.

Declaring fields (the declaration lives next to the code that reads the fields, in
<package>/fields.py: see DECLARATION_MODULES; a new module's declarations are found once it is
listed there, imported before `resolve` runs, or named by `model.module`). A new model, method,
objective or evaluator declares its fields once, here; its code then reads `cfg.key`, and
`tests/test_config_validation.py` checks that any remaining `cfg.get(key, literal)` agrees with
the declared default:

    from vlp_jax.config_schema import Derived, Each, Field, Select, Sub, declare, declares

    declare("optim", "adamw",                      # family 'optim', chosen by optim.name
            lr=Field(float),                       # required (no default)
            warmup_steps=Field(int, 0, doc="linear warmup steps"),
            b1=Field(float, 0.9))

    @declares("model", "my_model",                 # the same, as a decorator on a builder
              width=Field(int), mlp_dim=Field(int, Derived(lambda s, root: 4 * s.width)),
              text=Sub("my_model.text"))           # a nested section with its own family
    def build_my_model(cfg, vocab): ...

    declare("objective", None, weight=Field(float, 1.0))   # name None: fields common to
                                                           # every name of the family

The kinds of field:
  Field(type, default=REQUIRED, choices=None, doc=''): a leaf. `type` is int, float (ints
    accepted), bool, str, Seq(elem) (list or tuple), Map(value) (a free-form mapping), ANY, or
    a tuple of those; a default of None makes the field optional (None accepted). A default
    may be `Derived(fn)`: fn(section, root) computes it once the other fields are filled
    (e.g. mlp_dim = 4 * width). `default=OMIT`: optional and not filled in, for fields whose
    reader computes a fallback from something outside the config.
  Sub(family, optional=False): a nested section declared by `declare(family, None, ...)`;
    an absent optional Sub is created with its defaults.
  Select(family, key='name', default=REQUIRED, import_key=None): a nested section whose
    declaration is chosen by its own `key` (common fields of the family + those of the chosen
    name); with `import_key` (model.module), the module it names is imported first, so a model
    defined outside the package can declare its fields where it registers its builder.
    `extends=` in `declare` lets one name inherit another's fields (slip extends contrastive).
  Each(family, key='type', key_from_entry=False): a mapping {entry name: section}, each
    entry chosen by its `key` (evals by `type`; with key_from_entry=True an entry without the
    key is chosen by its entry name); key=None: every entry is the family's one declaration
    (the schedule overrides of `method.objectives`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
from typing import Any, Callable, Mapping

import ml_collections
from ml_collections import config_dict

# Modules whose import declares the project's fields (imported by `resolve` on first use).
DECLARATION_MODULES = (
    "vlp_jax.train.fields",        # the top level, train, optim, init, frozen
    "vlp_jax.data.fields",         # data
    "vlp_jax.parallel.fields",     # mesh
    "vlp_jax.models.fields",       # model (by model.name), image towers (by model.image.type)
    "vlp_jax.methods.fields",      # method (by method.name)
    "vlp_jax.evaluators.fields",   # evals (by evals.<name>.type)
)
ROOT = "root"   # the family of the top-level config


class ConfigError(ValueError):
    """A config that cannot run: the message names the field and what is valid."""


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Marker("REQUIRED")
OMIT = _Marker("OMIT")
ANY = _Marker("ANY")


@dataclasses.dataclass(frozen=True)
class Seq:
    """A list or tuple (of `elem`, if given)."""
    elem: Any = ANY


@dataclasses.dataclass(frozen=True)
class Map:
    """A mapping with free-form keys (values of `value`, if given)."""
    value: Any = ANY


@dataclasses.dataclass(frozen=True)
class Derived:
    """A default computed from the filled section (and the whole config): fn(section, root)."""
    fn: Callable[[Any, Any], Any]
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class Field:
    type: Any = ANY
    default: Any = REQUIRED
    choices: tuple | None = None
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class Sub:
    family: str
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Select:
    family: str
    key: str = "name"
    default: Any = REQUIRED
    import_key: str | None = None   # a key naming a module to import first (its declarations)


@dataclasses.dataclass(frozen=True)
class Each:
    family: str
    key: str | None = "type"        # None: every entry is the family's unnamed declaration
    key_from_entry: bool = False


@dataclasses.dataclass
class _Declaration:
    fields: dict[str, Any]
    extends: str | None = None


_REGISTRY: dict[str, dict[Any, _Declaration]] = {}
_loaded = False


def declare(family: str, name: str | None, extends: str | None = None, **fields) -> None:
    """Declares the fields of `family` (name=None: the fields common to all its names, or the
    only declaration of an unnamed section). Declaring a name twice updates its fields."""
    for key, spec in fields.items():
        if not isinstance(spec, (Field, Sub, Select, Each)):
            raise TypeError(f"declare({family!r}, {name!r}): {key} must be a Field, Sub, Select "
                            f"or Each, got {spec!r}")
    entry = _REGISTRY.setdefault(family, {}).setdefault(name, _Declaration({}, extends))
    entry.fields.update(fields)
    if extends is not None:
        entry.extends = extends


def declares(family: str, name: str | None, extends: str | None = None, **fields):
    """Decorator form of `declare`; returns the decorated object unchanged."""
    def wrap(obj):
        declare(family, name, extends=extends, **fields)
        return obj
    return wrap


def names(family: str) -> list[str]:
    """The declared names of a family (sorted)."""
    _load()
    return sorted(n for n in _REGISTRY.get(family, {}) if n is not None)


def fields_of(family: str, name: str | None = None) -> dict[str, Any]:
    """Every field of `name` in `family`: common ones, then the inherited, then its own."""
    _load()
    decls = _REGISTRY.get(family, {})
    out: dict[str, Any] = dict(decls[None].fields) if None in decls else {}
    chain, seen = [], set()
    while name is not None:
        if name in seen:
            raise ConfigError(f"declarations of {family!r} extend in a circle: {chain}")
        seen.add(name)
        chain.append(decls[name])
        name = decls[name].extends
    for decl in reversed(chain):
        out.update(decl.fields)
    return out


def declared() -> list[tuple[str, str | None, str, Any]]:
    """Every declaration as (family, name, key, spec) (for documentation and checks)."""
    _load()
    return [(family, name, key, spec) for family, decls in _REGISTRY.items()
            for name, decl in decls.items() for key, spec in decl.fields.items()]


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in DECLARATION_MODULES:
            importlib.import_module(module)


# ----------------------------------------------------------------------------- checking

def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    if isinstance(t, Seq):
        return "list" if t.elem is ANY else f"list of {_type_name(t.elem)}"
    if isinstance(t, Map):
        return "mapping" if t.value is ANY else f"mapping to {_type_name(t.value)}"
    return getattr(t, "__name__", repr(t))


def _is_mapping(v) -> bool:
    return isinstance(v, (Mapping, ml_collections.ConfigDict, ml_collections.FrozenConfigDict))


def _matches(value, t) -> bool:
    if t is ANY:
        return True
    if isinstance(t, tuple):
        return any(_matches(value, x) for x in t)
    if isinstance(t, Seq):
        return isinstance(value, (list, tuple)) and all(_matches(v, t.elem) for v in value)
    if isinstance(t, Map):
        return _is_mapping(value) and all(_matches(v, t.value) for v in value.values())
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


_MOVED: dict[str, str] = {}


def moved(dotted: str, hint: str) -> None:
    """Registers a key that no longer exists: `resolve` names `hint` (where it went) instead
    of the nearest valid key when a config still sets it."""
    _MOVED[dotted] = hint


def _unknown_key(path: str, key: str, valid, what: str = "") -> ConfigError:
    where = f"{path}." if path else ""
    if f"{where}{key}" in _MOVED:
        return ConfigError(f"config key {where}{key} was replaced by {_MOVED[where + key]}")
    section = f"section {path!r}" if path else "the top level"
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = (f"did you mean {where}{close[0]}?" if close
            else f"valid keys: {sorted(valid)}")
    return ConfigError(f"unknown config key {where}{key} in {section}{what}; {hint}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Resolver:
    def __init__(self, root):
        self.root = root

    def section(self, node, fields: dict[str, Any], path: str, what: str = "") -> None:
        """Checks and fills `node` (a ConfigDict, modified) against `fields`."""
        for key in list(node.keys()):
            if key not in fields:
                raise _unknown_key(path, key, fields, what)
        derived = []
        for key, spec in fields.items():
            here = _join(path, key)
            if isinstance(spec, Field):
                if key not in node:
                    if spec.default is REQUIRED:
                        raise ConfigError(f"config key {here} is required{what}")
                    if spec.default is OMIT:
                        continue
                    if isinstance(spec.default, Derived):
                        derived.append((key, spec))
                        continue
                    node[key] = _default_value(spec)
                self.leaf(node[key], spec, here)
            elif isinstance(spec, Sub):
                if key not in node or node[key] is None:
                    if not spec.optional:
                        raise ConfigError(f"config section {here} is required{what}")
                    node[key] = ml_collections.ConfigDict()
                self.sub(node[key], here, fields_of(spec.family), "")
            elif isinstance(spec, Select):
                if key not in node or node[key] is None:
                    if spec.default is REQUIRED:
                        raise ConfigError(f"config section {here} is required{what}")
                    node[key] = ml_collections.ConfigDict()
                if spec.import_key and _is_mapping(node[key]) and node[key].get(spec.import_key):
                    importlib.import_module(node[key][spec.import_key])
                self.select(node[key], here, spec.family, spec.key, spec.default)
            elif isinstance(spec, Each):
                if key not in node or node[key] is None:
                    node[key] = ml_collections.ConfigDict()
                entries = node[key]
                if not _is_mapping(entries):
                    raise ConfigError(f"config key {here} must be a mapping of named sections, "
                                      f"got {entries!r}")
                for name in list(entries.keys()):
                    if spec.key is None:
                        self.sub(entries[name], _join(here, name), fields_of(spec.family), "")
                        continue
                    self.select(entries[name], _join(here, name), spec.family, spec.key,
                                name if spec.key_from_entry else REQUIRED,
                                store_key=not spec.key_from_entry)
        for key, spec in derived:
            node[key] = spec.default.fn(node, self.root)
            self.leaf(node[key], spec, _join(path, key))

    def sub(self, node, path, fields, what):
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"config key {path} must be a section (mapping), got {node!r}")
        self.section(node, fields, path, what)

    def select(self, node, path, family, key, default, store_key=True):
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"config key {path} must be a section (mapping), got {node!r}")
        name = node[key] if key in node else default
        if name is REQUIRED:
            raise ConfigError(f"config key {_join(path, key)} is required; valid: {names(family)}")
        valid = names(family)
        if name not in valid:
            raise ConfigError(f"{_join(path, key)} {name!r} is unknown; valid: {valid}")
        if store_key and key not in node:
            node[key] = name
        fields = fields_of(family, name)
        fields.setdefault(key, Field(str, OMIT))     # the selecting key itself
        self.sub(node, path, fields, f" ({_join(path, key)}={name!r})")

    def leaf(self, value, spec: Field, path: str) -> None:
        if value is None and (spec.default is None or spec.default is OMIT):
            return
        if not _matches(value, spec.type):
            raise ConfigError(f"config key {path} must be {_type_name(spec.type)}, got "
                              f"{type(value).__name__} {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(f"config key {path}={value!r} is not valid; valid: "
                              f"{list(spec.choices)}")


def _default_value(spec: Field):
    d = spec.default
    if d is None and isinstance(spec.type, type) and spec.type in (int, float, str, bool):
        return config_dict.placeholder(spec.type)      # typed, so a later override can set it
    return copy.deepcopy(d)


def resolve(config) -> ml_collections.ConfigDict:
    """The whole experiment config checked against the declarations, with defaults filled in
    (a copy; the input is unchanged). Raises ConfigError naming the first bad field."""
    _load()
    out = copy.deepcopy(config)
    if not isinstance(out, ml_collections.ConfigDict):
        out = ml_collections.ConfigDict(out)
    with out.unlocked():
        _Resolver(out).section(out, fields_of(ROOT), "")
    return out


def resolve_part(key: str, node) -> ml_collections.ConfigDict:
    """One top-level section (`data`, `model`, `optim`, `mesh`, `train`, `init`, ...) checked
    and filled as `resolve` would (a copy; None = the section's defaults). Functions that take
    a section (make_mesh, make_optimizer, the data pipeline) call it on entry, so they read
    `cfg.key` whether or not their caller resolved the whole experiment."""
    _load()
    root_fields = fields_of(ROOT)
    if key not in root_fields:
        raise _unknown_key("", key, root_fields)
    out = ml_collections.ConfigDict()
    if node is not None:
        out[key] = copy.deepcopy(node)
    with out.unlocked():
        _Resolver(out).section(out, {key: root_fields[key]}, "")
    return out[key]


def resolve_entry(part: str, name: str, node, **defaults) -> ml_collections.ConfigDict:
    """One named entry of a top-level `Each` section (`evals.<name>`), checked and filled (a
    copy); `defaults` fill keys the entry lacks (e.g. type='retrieval' for an evaluator called
    directly)."""
    entry = dict(defaults, **dict(node or {}))
    return resolve_part(part, {name: entry})[name]


def resolve_section(family: str, node, name: str | None = None, path: str | None = None):
    """One section checked and filled (a copy): for functions that take a section (make_mesh,
    make_optimizer) and may be called without a resolved experiment."""
    _load()
    out = ml_collections.ConfigDict() if node is None else copy.deepcopy(node)
    if not isinstance(out, ml_collections.ConfigDict):
        out = ml_collections.ConfigDict(out)
    with out.unlocked():
        _Resolver(out).section(out, fields_of(family, name), path or family)
    return out


# ----------------------------------------------------------------------------- golden trees

def flatten(config, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': leaf value} of a config tree (empty sections as {})."""
    out: dict[str, Any] = {}
    for key in sorted(config.keys()):
        value = config[key]
        if _is_mapping(value):
            inner = flatten(value, f"{prefix}{key}.")
            out.update(inner if inner else {f"{prefix}{key}": {}})
        else:
            out[f"{prefix}{key}"] = value
    return out


def tree_lines(config) -> list[str]:
    """Sorted `key: value` lines of a config tree (values as repr; tuples and lists kept)."""
    return [f"{k}: {v!r}" for k, v in sorted(flatten(config).items())]


# ----------------------------------------------------------------------------- reference

def _spec_text(spec) -> tuple[str, str, str]:
    """(type, default, doc) of a declared field for the reference table."""
    if isinstance(spec, Field):
        d = spec.default
        default = ("(required)" if d is REQUIRED else "(not filled)" if d is OMIT
                   else (d.doc or "derived") if isinstance(d, Derived) else repr(d))
        doc = spec.doc + (f" [{', '.join(map(repr, spec.choices))}]" if spec.choices else "")
        return _type_name(spec.type), default, doc
    if isinstance(spec, Sub):
        return "section", "", f"fields of {spec.family!r}"
    if isinstance(spec, Select):
        return "section", "", f"{spec.family!r} chosen by its `{spec.key}`"
    return "mapping", "", f"named sections of {spec.family!r}" + (
        f" chosen by `{spec.key}`" if spec.key else "")


def reference() -> str:
    """Markdown tables of every declared field, family by family (python -m
    vlp_jax.config_schema prints it)."""
    _load()
    out = []
    for family in sorted(_REGISTRY, key=lambda f: (f != ROOT, f)):
        if family.startswith("_"):
            continue
        for name in sorted(_REGISTRY[family], key=lambda n: (n is not None, n or "")):
            decl = _REGISTRY[family][name]
            title = family if name is None else f"{family} = {name!r}"
            if decl.extends:
                title += f" (extends {decl.extends!r})"
            out += [f"### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
            out += [f"| {key} | {t} | {d} | {doc} |" for key, (t, d, doc) in
                    ((k, _spec_text(s)) for k, s in decl.fields.items())]
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":     # the declarations register into the imported module, not __main__
    from vlp_jax import config_schema
    print(config_schema.reference())
