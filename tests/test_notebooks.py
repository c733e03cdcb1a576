"""The notebooks in notebooks/ run top to bottom (so the quickstart cannot rot as the API moves).

Each notebook is executed in a fresh Python kernel by nbclient, from its own folder, with two
substitutions that keep the suite's budget: training runs `steps=30` instead of the recipe's
300, and the workdir is a temporary folder. Everything else is the notebook as committed.
"""
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
pytestmark = pytest.mark.slow


def _shrunk(source: str, workdir: str) -> str:
    source = re.sub(r"(clip_shapes\.py:smoke)'", r"\1,steps=30'", source)
    return source.replace("'/tmp/vlp_jax_notebook'", repr(workdir))


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")))
def test_notebook_runs_top_to_bottom(name, shapes_data_dir, tmp_path):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = _shrunk(cell.source, str(tmp_path / "workdir"))
    env_dir = os.environ.get("VLP_JAX_DATA_DIR")
    os.environ["VLP_JAX_DATA_DIR"] = str(tmp_path / "data")      # the kernel inherits it
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": NOTEBOOKS}}).execute()
    finally:
        if env_dir is None:
            os.environ.pop("VLP_JAX_DATA_DIR", None)
        else:
            os.environ["VLP_JAX_DATA_DIR"] = env_dir
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
