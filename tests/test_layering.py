"""The package's layering, read from its source (every import, function-level ones included):

    nn, parallel, data  <  losses  <  models  <  objectives  <  methods  <  evaluators  <  train  <  cli, sweep

- no import cycle between modules;
- nothing below `train/` imports `train/`;
- losses import no models (nor methods, objectives, train);
- evaluators import no methods (nor objectives, train): they see predict functions only;
- the building blocks (`nn`, `parallel`, `data`) import none of the layers above them.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "vlp_jax")

FORBIDDEN = {   # layer -> layers it must not import
    "nn": {"losses", "models", "objectives", "methods", "evaluators", "train", "data"},
    "parallel": {"losses", "models", "objectives", "methods", "evaluators", "train", "data"},
    "data": {"losses", "models", "objectives", "methods", "evaluators", "train", "nn"},
    "losses": {"models", "objectives", "methods", "evaluators", "train"},
    "models": {"objectives", "methods", "evaluators", "train"},
    "objectives": {"methods", "evaluators", "train"},
    "methods": {"evaluators", "train"},
    "evaluators": {"methods", "objectives", "train"},
}


def _modules() -> dict[str, str]:
    """dotted module name -> file path, for every module of vlp_jax."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def _imports(path: str, name: str, modules: dict[str, str]) -> set[str]:
    """vlp_jax modules imported anywhere in the file (a `from a import b` names module a.b
    when that is a module, else a)."""
    found = set()
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vlp_jax")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if not base.startswith("vlp_jax"):
                continue
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph():
    modules = _modules()
    return {m: _imports(p, m, modules) for m, p in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    bad = sorted(f"{m} imports {n}" for m, deps in _graph().items() if _layer(m) == layer
                 for n in deps if _layer(n) in FORBIDDEN[layer])
    assert not bad, "\n".join(bad)
