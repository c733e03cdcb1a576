"""Golden configs (as AXLearn's): the resolved config tree of every experiment file, with its
default argument and with `:smoke`, is pinned in tests/golden/<file>[.smoke].txt as sorted
`key: value` lines (`vlp_jax.config_schema.tree_lines`, declared defaults filled in). A change
to a recipe, or to a declared default, shows up here as a diff to review.

Regenerate after an intended change:

    python -m tests.test_golden_configs --update      (or VLP_JAX_UPDATE_GOLDEN=1 pytest ...)
"""
import difflib
import os
import sys

import pytest

from vlp_jax.config_args import load_config
from vlp_jax.config_schema import resolve, tree_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS_DIR = os.path.join(ROOT, "experiments")
GOLDEN_DIR = os.path.join(ROOT, "tests", "golden")
ARGS = {"": "", ":smoke": ".smoke"}            # experiment argument -> golden file suffix
UPDATE = os.environ.get("VLP_JAX_UPDATE_GOLDEN", "") not in ("", "0")


def experiment_files() -> list[str]:
    return sorted(f for f in os.listdir(EXPERIMENTS_DIR)
                  if f.endswith(".py") and not f.startswith("_") and f != "common.py")


def cases() -> list[tuple[str, str]]:
    return [(f, arg) for f in experiment_files() for arg in ARGS]


def golden_path(name: str, arg: str) -> str:
    return os.path.join(GOLDEN_DIR, name[:-3] + ARGS[arg] + ".txt")


def render(name: str, arg: str) -> str:
    config = resolve(load_config(os.path.join(EXPERIMENTS_DIR, name) + arg))
    return "\n".join(tree_lines(config)) + "\n"


def update() -> list[str]:
    """Rewrites every golden file (and removes those of deleted experiments)."""
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    wanted = {golden_path(n, a) for n, a in cases()}
    for path in set(os.path.join(GOLDEN_DIR, f) for f in os.listdir(GOLDEN_DIR)) - wanted:
        if path.endswith(".txt"):
            os.remove(path)
    for name, arg in cases():
        with open(golden_path(name, arg), "w") as f:
            f.write(render(name, arg))
    return sorted(wanted)


@pytest.mark.parametrize("name,arg", cases())
def test_resolved_config_matches_golden(name, arg):
    path = golden_path(name, arg)
    got = render(name, arg)
    if UPDATE:
        with open(path, "w") as f:
            f.write(got)
    if not os.path.exists(path):
        pytest.fail(f"no golden file {os.path.relpath(path, ROOT)}: run "
                    f"`python -m tests.test_golden_configs --update`")
    with open(path) as f:
        want = f.read()
    if got != want:
        diff = "".join(difflib.unified_diff(
            want.splitlines(True), got.splitlines(True),
            fromfile=os.path.relpath(path, ROOT), tofile=f"experiments/{name}{arg} (now)"))
        pytest.fail(f"the resolved config of experiments/{name}{arg} changed; if intended, "
                    f"run `python -m tests.test_golden_configs --update`\n{diff}")


def test_no_stale_golden_files():
    wanted = {os.path.basename(golden_path(n, a)) for n, a in cases()}
    stale = sorted(f for f in os.listdir(GOLDEN_DIR) if f.endswith(".txt") and f not in wanted)
    assert not stale, f"golden files without an experiment: {stale} (run --update)"


def test_the_golden_test_fails_on_a_changed_recipe(tmp_path, monkeypatch):
    """The comparison sees a one-value change (guards against a vacuous golden test)."""
    name, arg = "clip_shapes.py", ":smoke"
    changed = render(name, arg).replace("optim.lr: 0.001\n", "optim.lr: 0.002\n")
    assert changed != render(name, arg)
    path = tmp_path / "clip_shapes.smoke.txt"
    path.write_text(changed)
    monkeypatch.setattr(sys.modules[__name__], "golden_path", lambda n, a: str(path))
    with pytest.raises(pytest.fail.Exception, match=r"-optim.lr: 0.002\n\+optim.lr: 0.001"):
        test_resolved_config_matches_golden(name, arg)


if __name__ == "__main__":
    if "--update" not in sys.argv[1:]:
        sys.exit("usage: python -m tests.test_golden_configs --update")
    for path in update():
        print(os.path.relpath(path, ROOT))
