"""`vlp-jax` command line: train / eval / build-data / sweep for an experiment file.

    vlp-jax train --config experiments/clip_shapes.py --workdir workdirs/clip
    vlp-jax train --config experiments/clip_shapes.py:smoke --config.train.batch_size=64 ...
    vlp-jax eval  --config experiments/clip_shapes.py --workdir workdirs/clip
    vlp-jax build-data --config experiments/clip_shapes.py
    vlp-jax sweep --config experiments/ablation_flip_ratio.py[:smoke] --workdir workdirs/flip
    vlp-jax caption --config experiments/git_shapes.py --workdir workdirs/git --images a.png b.jpg
    vlp-jax data build --from FORMAT SRC... --out DIR [--root DIR] [--vocab-size N] [--split NAME]
    vlp-jax data show DIR [--out grid.png] [--n 16]

`data build` / `data show` take no experiment file (see `vlp_jax.data.build` / `.show`).

`--config path[:arg]` loads `get_config(arg)` from the file; any declared field can be
overridden with `--config.a.b=value` (or `--config.a.b value`); the value is converted to the
field's type. The config is then checked as a whole (`vlp_jax.config_schema.resolve`) before
anything is built.

Errors a user can cause (a missing or broken experiment argument, an unknown key or override,
a bad value, `eval` / `caption` on a workdir without checkpoints, a checkpoint of another
model, `sweep` on a file without variants, an unreadable image file) print one line, `vlp-jax <command>: error: ...`, on stderr and
exit with status 2 (USAGE_ERROR); a preempted run exits with `preemption.EXIT_PREEMPTED`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

COMMANDS = ("train", "eval", "build-data", "sweep", "caption")
USAGE_ERROR = 2
_OVERRIDE = re.compile(r"^--config\.([A-Za-z_][\w.]*)(?:=(.*))?$", re.S)


class UsageError(Exception):
    """A problem with the command line or the config; its message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, no usage block
        raise UsageError(message)


def _parser() -> _Parser:
    p = _Parser(prog="vlp-jax", allow_abbrev=False,
                description="Train, evaluate, sweep or build the data of an experiment file.",
                epilog="Any declared config field can be overridden: --config.train.batch_size=64 "
                       "(or --config.train.batch_size 64).")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                   help="experiment file with get_config(arg)")
    p.add_argument("--workdir", help="directory for checkpoints, metrics, eval.json")
    p.add_argument("--no_progress", action="store_true", help="disable the progress bar")
    p.add_argument("--images", nargs="+", default=(), metavar="FILE",
                   help="caption: image files to caption")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """argv (without the program name) -> (flags, [(dotted override key, text value)])."""
    known, rest = [], []
    items = list(argv)
    overrides = []
    i = 0
    while i < len(items):
        m = _OVERRIDE.match(items[i])
        if m is None:
            known.append(items[i])
            i += 1
            continue
        key, value = m.group(1), m.group(2)
        if value is None:
            if i + 1 >= len(items):
                raise UsageError(f"--config.{key} needs a value")
            value, i = items[i + 1], i + 1
        overrides.append((key, value))
        i += 1
    args, rest = _parser().parse_known_args(known)
    if rest:
        raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
    return args, overrides


def _one_line(error: BaseException, max_details: int = 3) -> str:
    """The message on one line: its first line and up to `max_details` more."""
    text = str(error).strip() or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 + max_details:
        lines = lines[:1 + max_details] + [f"... ({len(lines) - 1 - max_details} more lines)"]
    return "; ".join(lines)


def _has_checkpoint(workdir: str) -> bool:
    """Whether WORKDIR/checkpoints holds a finished step directory (orbax's '<step>/')."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _prepare(args, overrides):
    """Loads, overrides and checks the config (every error here is the user's)."""
    from vlp_jax.config_args import apply_overrides, load_config, parse_overrides
    from vlp_jax.config_schema import resolve
    try:
        config = load_config(args.config)
    except FileNotFoundError as e:
        raise UsageError(_one_line(e)) from None
    except ValueError as e:      # get_config's argument checks (unknown experiment argument...)
        raise UsageError(f"{args.config}: {_one_line(e)}") from None
    typed = parse_overrides(config, overrides)
    config = resolve(apply_overrides(config, typed))
    if args.command != "build-data" and not args.workdir:
        raise UsageError(f"`vlp-jax {args.command}` needs --workdir")
    if args.images and args.command != "caption":
        raise UsageError("--images is read by `vlp-jax caption` only")
    if args.command == "caption" and not args.images:
        raise UsageError("`vlp-jax caption` needs --images FILE [FILE ...]")
    if args.command in ("eval", "caption") and not _has_checkpoint(args.workdir):
        raise UsageError(f"no checkpoint in {os.path.join(args.workdir, 'checkpoints')} to "
                         f"evaluate (train first: vlp-jax train --config {args.config} "
                         f"--workdir {args.workdir})")
    if args.command in ("train", "eval", "caption"):
        from vlp_jax.parallel.mesh import make_mesh
        from vlp_jax.train.trainer import validate_config
        validate_config(config, make_mesh(config.mesh))
    return config, typed


def _run(args, overrides) -> None:
    from vlp_jax.config_schema import ConfigError
    from vlp_jax.parallel.distributed import maybe_initialize_distributed
    from vlp_jax.train.errors import CheckpointError
    maybe_initialize_distributed()     # before anything touches the devices (the mesh check)
    try:
        config, typed = _prepare(args, overrides)
        if args.command == "sweep":
            from vlp_jax.sweep import list_variants
            list_variants(args.config.partition(":")[0])
    except (ConfigError, ValueError) as e:
        raise UsageError(_one_line(e)) from None

    if args.command == "build-data":
        from vlp_jax.train.data_bridge import DataBridge
        print(f"dataset ready in {DataBridge(config.data).location()}")
        return
    from vlp_jax.train.preemption import EXIT_PREEMPTED, Preempted
    from vlp_jax.train.trainer import evaluate_checkpoint, train_and_evaluate
    progress = not args.no_progress
    try:
        if args.command == "sweep":
            from vlp_jax.sweep import markdown_table, run_sweep
            rows = run_sweep(args.config, args.workdir, overrides=typed, progress=progress)
            print(markdown_table(rows))
            return
        if args.command == "caption":
            from vlp_jax.train.caption import caption_files
            for path, text in zip(args.images, caption_files(config, args.workdir, args.images)):
                print(f"{path}\t{text}")
            return
        if args.command == "train":
            result = train_and_evaluate(config, args.workdir, progress=progress)
        else:
            result = evaluate_checkpoint(config, args.workdir)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except CheckpointError as e:   # no checkpoint, another model's, or a bad config.init one
        raise UsageError(_one_line(e)) from None
    except (FileNotFoundError, ValueError) as e:
        if args.command != "caption":
            raise
        # a missing or undecodable image file, a method that does not generate
        raise UsageError(_one_line(e)) from None
    print(json.dumps(result, indent=2, sort_keys=True))


def _data_parser() -> _Parser:
    p = _Parser(prog="vlp-jax data", allow_abbrev=False,
                description="Convert a dataset to array_record, or look at a converted one.")
    sub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="write SRC... as array_record + manifest.json in DIR")
    b.add_argument("--from", dest="fmt", required=True, metavar="FORMAT",
                   help="coco_json | karpathy | csv | tsv | webdataset | image_folder")
    b.add_argument("inputs", nargs="+", metavar="SRC")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--root", metavar="DIR", help="image root (default: the SRC file's folder)")
    b.add_argument("--split", metavar="NAME", help="split to write (default train; a Karpathy "
                   "file: train, validation and test)")
    b.add_argument("--vocab-size", type=int, default=32000, metavar="N",
                   help="sentencepiece vocabulary upper bound")
    b.add_argument("--tokenizer", metavar="FILE", help="a sentencepiece .model to copy instead")
    b.add_argument("--records-per-shard", type=int, default=10000, metavar="N")
    b.add_argument("--csv-img-key", help="csv/tsv column of image paths (default filepath)")
    b.add_argument("--csv-caption-key", help="csv/tsv column of captions (default title)")
    b.add_argument("--csv-separator", help="csv separator (default ',', tab for tsv)")
    s = sub.add_parser("show", help="print sizes / counts and write a PNG grid of samples")
    s.add_argument("directory", metavar="DIR")
    s.add_argument("--out", default="grid.png", metavar="PNG")
    s.add_argument("--n", type=int, default=16, help="samples in the grid")
    s.add_argument("--split", metavar="NAME", help="split to draw (default train)")
    s.add_argument("--verify", action="store_true", help="check every file's sha256")
    return p


def _data(argv: list[str]) -> None:
    """`vlp-jax data build|show ...` (argv after 'data'); a bad source is a UsageError."""
    args = _data_parser().parse_args(argv)
    from vlp_jax.data.sources import SourceError
    try:
        if args.action == "build":
            from vlp_jax.data.build import build
            csv_options = {"csv_img_key": args.csv_img_key,
                           "csv_caption_key": args.csv_caption_key,
                           "csv_separator": args.csv_separator}
            build(args.fmt, args.inputs, args.out, root=args.root, split=args.split,
                  vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                  records_per_shard=args.records_per_shard,
                  csv_options={k: v for k, v in csv_options.items() if v is not None})
        else:
            from vlp_jax.data.show import show
            show(args.directory, args.out, args.n, args.split, args.verify)
    except (SourceError, ValueError, OSError) as e:
        raise UsageError(_one_line(e)) from None


def main(argv: list[str] | None = None) -> None:
    """Entry point; `argv` includes the program name (as sys.argv)."""
    argv = list(sys.argv if argv is None else argv)
    command = argv[1] if len(argv) > 1 and argv[1] in COMMANDS + ("data",) else None
    try:
        if command == "data":
            _data(argv[2:])
            return
        args, overrides = parse_args(argv[1:])
        _run(args, overrides)
    except UsageError as e:
        where = f"vlp-jax {command}" if command else "vlp-jax"
        print(f"{where}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


if __name__ == "__main__":
    main()
