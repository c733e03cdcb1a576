"""`vlp-jax sweep`: every variant of an ablation file trains into W/<variant>/ and one table
of their final metrics is written (W/sweep.md, W/sweep.json)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from vlp_jax.sweep import (apply_overrides, list_variants, markdown_table, run_sweep,
                           variant_config, variant_dirname)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = {
    "ablation_flip_ratio.py": ["ratio=0", "ratio=0.5", "ratio=0.75"],
    "ablation_loss.py": ["loss=softmax", "loss=sigmoid"],
    "ablation_temperature.py": ["temp=learnable", "temp=fixed"],
    "ablation_batch.py": ["batch=64", "batch=256"],
}


def _path(name):
    return os.path.join(ROOT, "experiments", name)


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_files_list_variants_that_build(name):
    variants = list_variants(_path(name))
    assert variants == ABLATIONS[name]
    configs = [variant_config(_path(name), v, "smoke") for v in variants]
    assert len({c.to_json() for c in configs}) == len(variants), "variants must differ"


def test_ablation_variants_change_what_they_say():
    flip = [variant_config(_path("ablation_flip_ratio.py"), v) for v in ABLATIONS[
        "ablation_flip_ratio.py"]]
    assert [c.method.mask_ratio for c in flip] == [0.0, 0.5, 0.75]
    assert all(c.method.unmasked_tuning_steps == 0 for c in flip)
    loss = [variant_config(_path("ablation_loss.py"), v) for v in ABLATIONS["ablation_loss.py"]]
    assert [c.method.loss for c in loss] == ["softmax", "sigmoid"]
    assert loss[1].model.logit_bias_init == -10.0
    temp = [variant_config(_path("ablation_temperature.py"), v)
            for v in ABLATIONS["ablation_temperature.py"]]
    assert list(temp[0].frozen) == [] and list(temp[1].frozen) == ["logit_scale"]
    small, big = (variant_config(_path("ablation_batch.py"), v, "smoke")
                  for v in ABLATIONS["ablation_batch.py"])
    assert (small.train.batch_size, big.train.batch_size) == (64, 256)
    assert small.train.num_steps * 64 == big.train.num_steps * 256     # same examples seen
    assert big.method.accumulation == "grad_cache" and big.method.micro_batches == 4


def test_files_without_variants_are_rejected(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text("def get_config(arg=None):\n    return None\n")
    with pytest.raises(ValueError, match="declares no variants"):
        list_variants(str(path))


def test_table_and_helpers():
    rows = [{"variant": "a=1", "step": 10, "eval/top1": 50.123456},
            {"variant": "a/2", "step": 10, "train/loss": 1.5}]
    table = markdown_table(rows, "title")
    lines = table.splitlines()
    assert lines[0] == "# title"
    assert lines[2] == "| variant | step | eval/top1 | train/loss |"
    assert lines[4] == "| a=1 | 10 | 50.12 |  |"
    assert variant_dirname("a/2, b") == "a_2__b"
    cfg = variant_config(_path("ablation_loss.py"), "loss=sigmoid")
    apply_overrides(cfg, {"train.num_steps": 7, "optim.lr": 0.5})
    assert (cfg.train.num_steps, cfg.optim.lr) == (7, 0.5)


@pytest.mark.parametrize("name", ["vilt_shapes.py", "coattention_shapes.py"])
def test_family_files_with_preset_dicts_sweep_their_presets(name):
    """A dict VARIANTS of named presets (vilt_shapes.py, coattention_shapes.py) sweeps
    `variant=<name>`; every variant's config builds (smoke) and carries its preset."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("presets_" + name[:-3], _path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    presets = module.VARIANTS
    variants = list_variants(_path(name))
    assert variants == [f"variant={k}" for k in presets]
    configs = {k: variant_config(_path(name), v, "smoke") for k, v in zip(presets, variants)}
    assert len({c.to_json() for c in configs.values()}) == len(presets), "variants must differ"
    for key, config in configs.items():
        if name == "vilt_shapes.py":
            assert config.model.image_cls == presets[key]["image_cls"], key
            method = config.method.to_json()
            assert all(f'"{o}"' in method for o in presets[key]["objectives"]), (key, method)
        else:
            for field, value in presets[key].items():
                assert config.model[field] == value, (key, field)
