"""`vlp-jax` command line: train / eval / build-data for an experiment file.

    vlp-jax train --config experiments/clip_shapes.py --workdir workdirs/clip
    vlp-jax train --config experiments/clip_shapes.py:smoke --config.train.batch_size=64 ...
    vlp-jax eval  --config experiments/clip_shapes.py --workdir workdirs/clip
    vlp-jax build-data --config experiments/clip_shapes.py
    vlp-jax sweep --config experiments/ablation_flip_ratio.py[:smoke] --workdir workdirs/flip

`--config path[:arg]` loads `get_config(arg)` from the file; any field can be overridden with
`--config.a.b=value`.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train", "eval", "build-data", "sweep")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (get_config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, eval.json.")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Disable the progress bar.")


def _run(command: str) -> None:
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    from vlp_jax.parallel.distributed import maybe_initialize_distributed
    maybe_initialize_distributed()
    if command == "build-data":
        from vlp_jax.train.data_bridge import DataBridge
        bridge = DataBridge(config.data)
        print(f"dataset ready in {bridge.location()}")
        return
    if not _WORKDIR.value:
        raise app.UsageError(f"`vlp-jax {command}` needs --workdir")
    from vlp_jax.train.preemption import EXIT_PREEMPTED, Preempted
    from vlp_jax.train.trainer import evaluate_checkpoint, train_and_evaluate
    if command == "sweep":   # every variant of an ablation file, then W/sweep.md + sweep.json
        from vlp_jax.sweep import markdown_table, run_sweep
        flag = flags.FLAGS["config"]
        try:
            rows = run_sweep(config_flags.get_config_filename(flag), _WORKDIR.value,
                             overrides=config_flags.get_override_values(flag),
                             progress=not _NO_PROGRESS.value)
        except Preempted as e:
            print(str(e), file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)
        print(markdown_table(rows))
        return
    if command == "train":
        try:
            result = train_and_evaluate(config, _WORKDIR.value, progress=not _NO_PROGRESS.value)
        except Preempted as e:
            print(str(e), file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)
    else:
        result = evaluate_checkpoint(config, _WORKDIR.value)
    print(json.dumps(result, indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(f"usage: vlp-jax {{{','.join(COMMANDS)}}} --config FILE[:ARG] [--workdir DIR] "
              f"[--config.FIELD=VALUE ...]", file=sys.stderr)
        sys.exit(2)
    command = argv[1]
    app.run(lambda _: _run(command), argv=[argv[0]] + argv[2:])


if __name__ == "__main__":
    main()
