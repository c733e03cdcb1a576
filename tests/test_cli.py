"""The `vlp-jax` command line: flag overrides reach the config (including fields whose default
is None, typed placeholders, and declared fields the experiment file does not set), and errors
a user can cause end in one line on stderr and exit status 2, without a traceback."""
import os
import subprocess
import sys

import numpy as np
import pytest

from vlp_jax import cli
from tests.helpers import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = os.path.join(ROOT, "experiments", "clip_shapes.py")


def test_build_data_honours_data_dir_and_size_overrides(tmp_path):
    data_dir = tmp_path / "data"
    env = child_env(VLP_JAX_DATA_DIR=str(tmp_path / "not_here"))
    cmd = [sys.executable, "-m", "vlp_jax.cli", "build-data",
           "--config", CLIP + ":smoke",
           f"--config.data.data_dir={data_dir}", "--config.data.num_train=32",
           "--config.data.num_validation=8", "--config.data.num_test=8",
           "--config.evals.zeroshot.max_examples=8"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = [d for d in os.listdir(data_dir / "vlp_shapes") if "n32-8-8" in d]
    assert built, os.listdir(data_dir / "vlp_shapes")
    assert not (tmp_path / "not_here").exists()


def _fails(capsys, *argv) -> str:
    """Runs `vlp-jax argv...` in-process; asserts exit status 2 and a one-line stderr without
    a traceback; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["vlp-jax", *argv])
    assert exit_info.value.code == cli.USAGE_ERROR
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_config_file(capsys, tmp_path):
    line = _fails(capsys, "train", "--config", str(tmp_path / "nope.py"), "--workdir", "w")
    assert line.startswith("vlp-jax train: error:") and "nope.py" in line
    assert "does not exist" in line


def test_a_file_that_is_not_an_experiment(capsys, tmp_path):
    path = tmp_path / "notes.py"
    path.write_text("x = 1\n")
    assert "defines no get_config" in _fails(capsys, "train", "--config", str(path),
                                             "--workdir", "w")


def test_unknown_override_names_the_nearest_key(capsys):
    line = _fails(capsys, "train", "--config", CLIP + ":smoke", "--config.train.bach_size=3",
                  "--workdir", "w")
    assert "unknown override --config.train.bach_size" in line
    assert "did you mean --config.train.batch_size?" in line


@pytest.mark.parametrize("override,match", [
    ("--config.train.batch_size=abc", "--config.train.batch_size: 'abc' is not int"),
    ("--config.model.remat=maybe", "--config.model.remat: 'maybe' is not bool"),
    ("--config.train.nonfinite=skp", "train.nonfinite='skp' is not valid"),
    ("--config.method.loss=hinge", "method.loss='hinge' is not valid"),
])
def test_bad_override_values(capsys, override, match):
    assert match in _fails(capsys, "train", "--config", CLIP + ":smoke", override,
                           "--workdir", "w")


def test_overrides_reach_the_resolved_config():
    """`--config.a.b=v` and `--config.a.b v` both work; declared keys the experiment file
    leaves out (mesh.num_devices) can be set; linked fields follow."""
    from vlp_jax.config_args import apply_overrides, load_config, parse_overrides
    from vlp_jax.config_schema import resolve
    args, items = cli.parse_args(["train", "--config", CLIP + ":smoke", "--workdir", "w",
                                  "--config.mesh.num_devices=1", "--config.optim.lr", "0.5",
                                  "--config.data.text_length=20",
                                  "--config.evals.zeroshot.ks=(1, 3)"])
    assert (args.command, args.workdir) == ("train", "w")
    config = load_config(args.config)
    config = resolve(apply_overrides(config, parse_overrides(config, items)))
    assert config.mesh.num_devices == 1 and config.optim.lr == 0.5
    assert config.model.text.context_length == 20 and tuple(config.evals.zeroshot.ks) == (1, 3)


def test_bad_experiment_argument_and_missing_workdir(capsys):
    assert "unknown experiment argument 'smok'" in _fails(
        capsys, "train", "--config", CLIP + ":smok", "--workdir", "w")
    assert "needs --workdir" in _fails(capsys, "train", "--config", CLIP + ":smoke")
    assert "invalid choice: 'trian'" in _fails(capsys, "trian", "--config", CLIP)
    assert "unrecognized arguments: --wrokdir" in _fails(
        capsys, "train", "--config", CLIP + ":smoke", "--wrokdir", "w")


def test_eval_without_checkpoints(capsys, tmp_path):
    line = _fails(capsys, "eval", "--config", CLIP + ":smoke", "--workdir", str(tmp_path))
    assert line.startswith("vlp-jax eval: error: no checkpoint in ")
    assert str(tmp_path / "checkpoints") in line


def test_sweep_on_a_file_without_variants(capsys, tmp_path):
    line = _fails(capsys, "sweep", "--config", CLIP + ":smoke", "--workdir", str(tmp_path))
    assert "declares no variants" in line


def test_eval_on_a_checkpoint_of_another_model(capsys, tmp_path, shapes_data_dir):
    """A workdir whose checkpoint holds other arrays than this config's model: one line
    naming the mismatch (train/checkpoint.py's CheckpointMismatchError), no traceback."""
    from vlp_jax.train.checkpoint import Checkpointer
    experiment = tmp_path / "tiny_clip.py"
    experiment.write_text(
        "from tests.helpers import tiny_clip_config\n"
        "from vlp_jax.data.pipeline import tiny_data_config\n\n\n"
        "def get_config(arg=None):\n"
        f"    return tiny_clip_config(tiny_data_config(data_dir={shapes_data_dir!r}), steps=2)\n")
    workdir = tmp_path / "other"
    ckpt = Checkpointer(str(workdir / "checkpoints"))
    ckpt.save(1, {"params": {"other_model": np.zeros((3, 5), np.float32)}}, {"pos": 0},
              force=True)
    ckpt.close()
    line = _fails(capsys, "eval", "--config", str(experiment), "--workdir", str(workdir))
    assert "does not match this model" in line and str(workdir) in line


def test_caption_needs_images_and_a_checkpoint(capsys, tmp_path):
    git = os.path.join(ROOT, "experiments", "git_shapes.py")
    work = ("--config", git, "--workdir", str(tmp_path))
    assert "needs --images" in _fails(capsys, "caption", *work)
    assert "no checkpoint" in _fails(capsys, "caption", *work, "--images", "a.png")
    assert "--images is read by `vlp-jax caption` only" in _fails(capsys, "eval", *work,
                                                                  "--images", "a.png")
