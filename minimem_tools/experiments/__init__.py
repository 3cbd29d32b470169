"""``minimem experiment NAME [--quick] [--seeds K] [--out DIR]``: reproduce the papers' claims at toy scale.

``minimem experiment report [--out DIR]`` writes DIR/README.md (default ``results/``): every paper
claim the experiments test, its toy-scale outcome and a verdict (:mod:`minimem_tools.experiments.claims`).

Each experiment (see ``--list``) trains and measures a set of variants over K seeds and
writes ``NAME.json`` (every run's config, seed, metrics and wall time, the git commit, and
mean / std / n per variant), ``NAME.md`` (the table) and its plots (PNG and SVG) to DIR.
A DIR that already holds ``NAME.json`` is refused unless ``--resume`` (keep its finished runs)
or ``--overwrite`` (replace it) says what to do with it.
Full runs default to ``results/`` (committed), ``--quick`` runs (1 seed, few steps: a
pipeline check, not evidence) to ``runs/experiments-quick/``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from minimem.guards import check_output_folder
from minimem_tools.cli import ArgumentParser, usage_error
from minimem_tools.experiments.runner import (
    EXPERIMENTS,
    check_results_free,
    load_experiment,
    read_results,
    run_experiment,
    seeds_for,
)

PROG = "minimem experiment"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("name", nargs="?", help=f"one of {', '.join(EXPERIMENTS)}, all, or report (the claims table)")
    p.add_argument("--quick", action="store_true", help="1 seed (unless --seeds), few steps: checks the pipeline")
    p.add_argument(
        "--seeds", type=int, default=None, help="number of seeds K (seeds 0..K-1); default 3, 1 with --quick"
    )
    p.add_argument(
        "--out", default=None, help="output folder (default results/, or runs/experiments-quick with --quick)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each in its own process with 1 CPU thread (default 1; timings are cleanest with 1)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of an interrupted NAME.json in DIR (same name, seed and config)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DIR/NAME.json and its table and plots (kept until the first new run finishes)",
    )
    p.add_argument("--list", action="store_true", help="list the experiments and the claims they test")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for name in EXPERIMENTS:
            print(f"{name:<15} {load_experiment(name).CLAIM}")
        print(f"{'all':<15} every experiment above, in this order")
        print(f"{'report':<15} results/README.md: every claim tested, its outcome and verdict")
        return 0
    if args.name is None:
        return usage_error(PROG, "give an experiment NAME (see --list)")
    if args.name != "report" and args.name != "all" and args.name not in EXPERIMENTS:
        return usage_error(
            PROG, f"unknown experiment {args.name!r}; choose one of {', '.join(EXPERIMENTS)}, all, report"
        )
    out = args.out or ("runs/experiments-quick" if args.quick else "results")
    try:  # every input is checked before the first run starts, so nothing is half done
        check_output_folder(out, "--out")
        if args.name == "report":
            used = [
                flag
                for flag, given in (
                    ("--quick", args.quick),
                    ("--seeds", args.seeds is not None),
                    ("--jobs", args.jobs != 1),
                    ("--resume", args.resume),
                    ("--overwrite", args.overwrite),
                )
                if given
            ]
            if used:
                raise ValueError(f"report only reads the results in --out; leave out {', '.join(used)}")
            names = [name for name in EXPERIMENTS if (Path(out) / f"{name}.json").is_file()]
        else:
            names = list(EXPERIMENTS) if args.name == "all" else [args.name]
            seeds = seeds_for(args.seeds if args.seeds is not None else (1 if args.quick else 3))
            if not 1 <= args.jobs <= (os.cpu_count() or 1):
                raise ValueError(f"--jobs must be >= 1 and at most the {os.cpu_count()} CPUs, got {args.jobs}")
        if args.name != "report":  # results already in --out are kept unless --resume or --overwrite says otherwise
            for name in names:
                check_results_free(out, name, args.resume, args.overwrite)
        if args.resume or args.name == "report":  # the results files they read must be whole
            for name in names:
                path = Path(out) / f"{name}.json"
                if path.exists():
                    read_results(path)  # ValueError naming the file; it stays as it is
    except ValueError as err:
        return usage_error(PROG, str(err))
    if args.name == "report":
        from minimem_tools.experiments.claims import write_report

        print(f"wrote {write_report(out)}")
        return 0
    started = time.perf_counter()
    for name in names:
        run_experiment(
            name,
            quick=args.quick,
            seeds=seeds,
            out_dir=out,
            progress=not args.no_progress,
            workers=args.jobs,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    if len(names) > 1:
        print(f"\nall experiments finished in {time.perf_counter() - started:.0f} s")
    return 0


__all__ = ["main", "run_experiment", "EXPERIMENTS"]
