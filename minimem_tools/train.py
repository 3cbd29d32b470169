"""``minimem train``: the command line of :func:`minimem.train.train`.

    minimem train --config configs/shakespeare-dense.yaml [--max-steps N] [--out DIR]
                  [--resume | --overwrite] [--set train.lr=2e-3 ...]
                  [--use-exercises [SOURCE] [--use-exercises-kernels]]   (minimem_tools.learner)

A bad config, ``--out`` or checkpoint exits 2 with one line; a diverged run or a full disk exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

from minimem.checkpoint import latest_checkpoint
from minimem.config import Config, load_config
from minimem.train import DiskFull, SetupError, TrainingDiverged, train
from minimem_tools import learner
from minimem_tools.cli import ArgumentParser, usage_error
from minimem_tools.experiments import ultramemv2_ablation  # noqa: F401  (registers kind ultramemv2-ablation)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="minimem train", description="Train a model from a YAML config.")
    parser.add_argument("--config", help="YAML config file (optional with --resume: the run's saved config)")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--out", help="run folder (override train.out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in the run folder (kept until the new run's first checkpoint)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        action="extend",
        help="override config fields, e.g. --set train.lr=2e-3 model.n_layer=6",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--use-exercises",
        nargs="?",
        const="learner",
        metavar="SOURCE",
        help="build the memory layers from your exercise solutions (UltraMemV2: 5.2, 6.1, 6.2; PKM, PEER: 2.2): "
        "./exercises when no SOURCE, a folder from `minimem exercises init`, or 'reference' (minimem_tools.learner)",
    )
    parser.add_argument(
        "--use-exercises-kernels",
        action="store_true",
        help="with --use-exercises: the memory read's weighted sum in your Triton kernels (7.1, 7.2); "
        "needs train.device cuda",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The run's config: the YAML file (or, with --resume and no --config, the run's config.json) plus overrides."""
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.out is not None:
        overrides.append(f"train.out_dir={json.dumps(args.out)}")
    if args.config is not None:
        return load_config(args.config, overrides)
    if not args.resume:
        raise ValueError("--config is required (it may be left out only with --resume)")
    out = Path(args.out) if args.out else Path(Config().train.out_dir)
    path = latest_checkpoint(out)
    if path is None:
        raise ValueError(f"--resume without --config: no checkpoint in {out}")
    return load_config(path / "config.json", overrides, saved=True)


def learner_error(args: argparse.Namespace, config: Config) -> Optional[str]:
    """Why --use-exercises / --use-exercises-kernels cannot build this run (None when they can)."""
    if args.use_exercises_kernels and args.use_exercises is None:
        return "--use-exercises-kernels goes with --use-exercises (whose solutions to take)"
    if args.use_exercises is not None and type(config.model.memory) not in learner.CONFIGS:
        return "--use-exercises builds UltraMemV2, PKM or PEER: use a config with model.memory.kind ultramemv2/pkm/peer"
    on_gpu = config.train.device.startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1"
    if args.use_exercises_kernels and not on_gpu:
        device = config.train.device
        return f"--use-exercises-kernels runs your Triton kernels on a GPU: train.device is {device}, not cuda"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        return usage_error(parser.prog, str(err))
    if (error := learner_error(args, config)) is not None:
        return usage_error(parser.prog, error)
    try:
        switch = learner.use_exercises(args.use_exercises, kernels=args.use_exercises_kernels)
        with switch if args.use_exercises else contextlib.nullcontext():
            train(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except (NotImplementedError, FileNotFoundError) as err:  # an exercise not written yet, or no such folder
        return usage_error(parser.prog, f"--use-exercises: {err}")
    except SetupError as err:  # bad config, --out, dataset, device or checkpoint: no traceback
        return usage_error(parser.prog, str(err))
    except (TrainingDiverged, DiskFull) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    return 0
