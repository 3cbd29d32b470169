"""The experiment runner: registry, seeds, determinism, the results JSON, tables and plots.

An experiment is a module in this package that defines

- ``NAME`` and ``CLAIM`` (one line: the paper claim it tests, with its Specification section),
- ``TABLE`` : list of ``(metric, format)`` pairs shown in the markdown table,
- ``variants(quick) -> list[Variant]`` : what to run, each a full config plus labels,
- ``run(variant, seed, quick) -> dict`` : train / measure one variant with one seed,
- ``plot(result, out_dir) -> list[Path]`` : its figures (through :func:`save_figure`),
- optionally ``notes(result) -> list[str]`` : derived findings printed under the table,
- optionally ``finalize(result, out_dir, quick)`` : extra measurements after the runs (they
  may add top-level keys to the result, e.g. head2head's interleaved step timing).

:func:`run_experiment` runs every (variant, seed) pair with a progress bar, writes
``NAME.json`` after each run (so a killed run keeps what finished), then the summary
(mean, sample std and n over seeds), ``NAME.md`` and the plots (PNG and SVG).
"""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

import minimem
import minimem_tools
from minimem import train
from minimem_tools import course

# Experiment name -> module; "all" runs them in this order.
EXPERIMENTS = {
    "head2head": "minimem_tools.experiments.head2head",
    "density": "minimem_tools.experiments.density",
    "ablations": "minimem_tools.experiments.ablations",
    "ultramem_ablations": "minimem_tools.experiments.ultramem_ablations",
    "init_stability": "minimem_tools.experiments.init_stability",
    "memory_access": "minimem_tools.experiments.memory_access",
    "in_context": "minimem_tools.experiments.in_context",
    "capacity": "minimem_tools.experiments.capacity",
    "converged": "minimem_tools.experiments.converged",
    "retrieval": "minimem_tools.experiments.retrieval",
}

# Metrics measured with a clock: they depend on the machine's load and are excluded from
# the reproducibility check (everything else must be bit-identical for equal seeds).
TIMING_SUFFIXES = ("_per_s", "_ms", "_s", "_time_ratio")


@dataclass
class Variant:
    """One row of an experiment: a full config dict and the labels that tell it apart."""

    name: str
    config: dict  # Config.to_dict(): model + train, validated
    labels: dict = field(default_factory=dict)  # e.g. {"model": "pkm", "parity": "active"}
    task: dict = field(default_factory=dict)  # experiment-specific settings outside Config


def is_timing_metric(name: str) -> bool:
    return name.endswith(TIMING_SUFFIXES)


def load_experiment(name: str):
    """The module of experiment ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {sorted(EXPERIMENTS)} or 'all', got {name!r}")
    return importlib.import_module(EXPERIMENTS[name])


# --------------------------------------------------------------------------- reproducibility


def seed_everything(seed: int, threads: int = 1) -> None:
    """:func:`minimem.train.seed_everything`, then one CPU thread and deterministic algorithms.

    With one thread the CPU kernels reduce in a fixed order, so the same seed gives the same
    numbers on the same machine and torch build.
    """
    train.seed_everything(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def source_digest() -> str:
    """SHA-256 over the Python sources of ``minimem`` and ``minimem_tools`` and ``configs/*.yaml``: the
    code a result came from, even when it was not committed yet (or runs from an installed wheel)."""
    import hashlib

    digest = hashlib.sha256()
    files = []
    for package in (minimem, minimem_tools):
        folder = Path(package.__file__).parent
        files += [(f"{package.__name__}/{p.relative_to(folder).as_posix()}", p) for p in sorted(folder.rglob("*.py"))]
    files += [(f"configs/{p.name}", p) for p in sorted(course.path("configs").glob("*.yaml"))]
    for name, path in files:
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def git_commit() -> tuple[str, bool]:
    """``(commit hash, working tree dirty?)`` of the checkout, or ``("unknown", True)`` (e.g. from a wheel)."""
    root = course.checkout_root()
    try:
        if root is None:
            raise OSError("not a checkout")
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return head.stdout.strip(), bool(status.stdout.strip())


# --------------------------------------------------------------------------- summary


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def mean_std(values: Iterable[Any]) -> dict:
    """``{"mean", "std", "n"}`` over the finite values (sample std, ddof=1; 0 when n = 1).

    Non-finite values (a diverged run's loss) are left out and do not count in ``n``; the
    experiments that can diverge report a separate 0/1 ``diverged`` metric.
    """
    xs = [x for x in (_finite(v) for v in values) if x is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(xs)}


def summarise(runs: list[dict]) -> list[dict]:
    """One entry per run name (first-seen order): ``{"name", metric: {"mean", "std", "n"}}``."""
    names, by_name = [], {}
    for run in runs:
        if run["name"] not in by_name:
            names.append(run["name"])
            by_name[run["name"]] = []
        by_name[run["name"]].append(run)
    summary = []
    for name in names:
        group = by_name[name]
        metrics: list[str] = []
        for run in group:
            metrics += [k for k in run["metrics"] if k not in metrics]
        entry = {"name": name}
        for metric in metrics:
            entry[metric] = mean_std(run["metrics"].get(metric) for run in group)
        entry["wall_time_s"] = mean_std(run["wall_time_s"] for run in group)
        summary.append(entry)
    return summary


def summary_of(result: dict, name: str) -> dict:
    """The summary entry of run ``name`` (KeyError naming the known names otherwise)."""
    for entry in result["summary"]:
        if entry["name"] == name:
            return entry
    raise KeyError(f"no run named {name!r}; known: {[e['name'] for e in result['summary']]}")


def stat(result: dict, name: str, metric: str) -> tuple[float, float, int]:
    """``(mean, std, n)`` of ``metric`` for run ``name``; NaN where nothing finite was measured."""
    s = summary_of(result, name).get(metric)
    if s is None or s["mean"] is None:
        return math.nan, math.nan, 0
    return s["mean"], s["std"], s["n"]


def labels_of(result: dict) -> dict[str, dict]:
    """Run name -> its labels (the same for every seed)."""
    return {run["name"]: run.get("labels", {}) for run in result["runs"]}


def _json_safe(value: Any) -> Any:
    """NaN / inf -> None (JSON has no NaN); tensors and numpy scalars -> python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
        return _json_safe(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- tables


def format_stat(s: Optional[dict], fmt: str) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    if s["n"] > 1:
        return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"
    return f"{s['mean']:{fmt}}"


def markdown_table(result: dict, columns: list[tuple[str, str]]) -> str:
    """A markdown table: one row per run name, ``mean ± std`` (over seeds) per metric."""
    header = ["run"] + [metric for metric, _ in columns] + ["seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in result["summary"]:
        n = max((v["n"] for k, v in entry.items() if isinstance(v, dict)), default=0)
        cells = [entry["name"]] + [format_stat(entry.get(metric), fmt) for metric, fmt in columns] + [str(n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, out_dir: Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` (no timestamps in the files, so reruns diff cleanly)."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=120, metadata={"Software": None})
    fig.savefig(paths[1], metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return paths


def errorbar(ax, result: dict, names: list[str], metric: str, xs: list[float], label: str, **kwargs) -> None:
    """Plot ``metric`` of runs ``names`` at ``xs`` with error bars = std over seeds."""
    stats = [stat(result, n, metric) for n in names]
    ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=label, **kwargs)


def curve(ax, result: dict, name: str, metrics: list[str], xs: list[float], label: str) -> None:
    """Plot run ``name``'s ``metrics`` (one per x, e.g. a metric at each step) with std-over-seeds error bars;
    points not measured are left out."""
    points = [(x, stat(result, name, metric)) for x, metric in zip(xs, metrics)]
    points = [(x, s) for x, s in points if not math.isnan(s[0])]
    if points:
        ax.errorbar(
            [x for x, _ in points],
            [s[0] for _, s in points],
            yerr=[s[1] for _, s in points],
            marker="o",
            ms=3,
            capsize=2,
            label=label,
        )


def bar_chart(ax, result: dict, names: list[str], metric: str, labels: Optional[list[str]] = None, color=None) -> None:
    """Bars of ``metric`` per run with std-over-seeds error bars."""
    stats = [stat(result, n, metric) for n in names]
    pos = list(range(len(names)))
    ax.bar(pos, [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3, color=color)
    ax.set_xticks(pos)
    ax.set_xticklabels(labels or names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(metric)


# --------------------------------------------------------------------------- running


def _config_key(config: Any) -> str:
    """A run's config as text for ``resume``, with fields added since it ran filled by their defaults.

    A config that :func:`minimem.config.config_from_dict` does not accept is compared as it is.
    """
    from minimem.config import config_from_dict

    config = _json_safe(config)
    try:
        config = _json_safe(config_from_dict(json.loads(json.dumps(config)), saved=True).to_dict())
    except (TypeError, ValueError, KeyError):
        pass
    return json.dumps(config, sort_keys=True)


def with_seed(variant: Variant, seed: int) -> Variant:
    """A copy of ``variant`` whose config trains with ``seed`` (``train.seed``: init, batches, data)."""
    config = copy.deepcopy(variant.config)
    if "train" in config:
        config["train"]["seed"] = seed
    return Variant(variant.name, config, dict(variant.labels), dict(variant.task))


def seeds_for(count: int) -> list[int]:
    """Seeds ``0 .. count - 1``."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"--seeds must be a positive integer, got {count!r}")
    return list(range(count))


def run_job(name: str, variant: Variant, seed: int, quick: bool) -> dict:
    """One (variant, seed) run of experiment ``name``: the entry that goes into ``runs``."""
    module = load_experiment(name)
    seed_everything(seed)
    t0 = time.perf_counter()
    metrics = module.run(variant, seed, quick)
    return {
        "name": variant.name,
        "config": variant.config,
        "seed": seed,
        "labels": variant.labels,
        "metrics": metrics,
        "wall_time_s": time.perf_counter() - t0,
    }


def _job(args) -> tuple[int, dict]:
    index, name, variant, seed, quick = args
    return index, run_job(name, variant, seed, quick)


def _execute(name: str, jobs: list, quick: bool, workers: int):
    """Yield ``(index, run entry)``: in this process, or in ``workers`` spawned processes (1 thread each).

    Every job seeds itself, so the numbers do not depend on ``workers`` or on the order.
    """
    if workers == 1:
        for index, variant, seed in jobs:
            yield index, run_job(name, variant, seed, quick)
        return
    import multiprocessing
    import signal
    import threading

    def stop(signum, frame):  # SIGTERM (kill, a scheduler): unwind, so that leaving the pool stops its workers
        raise SystemExit(128 + signum)

    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            yield from pool.imap_unordered(_job, [(i, name, v, s, quick) for i, v, s in jobs])
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def run_experiment(
    name: str,
    quick: bool = False,
    seeds: Optional[list[int]] = None,
    out_dir: str | Path = "results",
    progress: bool = True,
    verbose: bool = True,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run experiment ``name`` for every variant and seed; write JSON, markdown and plots.

    Returns the result dict (the JSON's content). ``seeds`` defaults to 1 seed with
    ``quick`` and 3 otherwise. ``workers`` > 1 runs that many jobs at once in separate
    processes (one CPU thread each): the same numbers, except the clock-based ones.
    ``resume`` keeps the runs of an earlier, interrupted ``NAME.json`` in ``out_dir`` whose
    name, seed and full config equal a job's, and runs only the others (a torn ``NAME.json``
    is a ValueError that names it, and stays as it is). An existing ``NAME.json`` is never
    replaced unless ``overwrite`` (:func:`check_results_free`); it stays whole until the first
    new run has finished.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers (--jobs) must be a positive integer, got {workers!r}")
    check_results_free(out_dir, name, resume, overwrite)
    module = load_experiment(name)
    seeds = list(seeds) if seeds is not None else seeds_for(1 if quick else 3)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    commit, dirty = git_commit()
    variants = module.variants(quick)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"experiment {name!r} has duplicate variant names: {names}")
    result = {
        "experiment": name,
        "claim": module.CLAIM,
        "git_commit": commit,
        "git_dirty": dirty,
        "source_sha256": source_digest(),
        "quick": quick,
        "seeds": seeds,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "runs": [],
        "summary": [],
    }
    json_path = out_dir / f"{name}.json"
    jobs = [(i, with_seed(v, s), s) for i, (v, s) in enumerate((v, s) for v in variants for s in seeds)]
    done: dict[int, dict] = {}
    if resume and json_path.exists():
        earlier = {(r["name"], r["seed"], _config_key(r["config"])): r for r in read_results(json_path)["runs"]}
        for index, variant, seed in jobs:
            key = (variant.name, seed, _config_key(variant.config))
            if key in earlier:
                done[index] = earlier[key]
        jobs = [job for job in jobs if job[0] not in done]
        result["resumed_runs"] = len(done)
        result["runs"] = [done[i] for i in sorted(done)]
    started = time.perf_counter()
    bar = tqdm(
        total=len(jobs) + len(done),
        initial=len(done),
        desc=f"experiment {name}",
        unit="run",
        disable=not progress,
        dynamic_ncols=True,
    )
    for index, entry in _execute(name, jobs, quick, workers):
        done[index] = entry
        result["runs"] = [done[i] for i in sorted(done)]
        _write_json(json_path, result)  # partial results survive an interrupted suite
        bar.set_postfix_str(f"{entry['name']} seed={entry['seed']}")
        bar.update(1)
    bar.close()
    result["summary"] = summarise(result["runs"])
    if hasattr(module, "finalize"):
        seed_everything(seeds[0])
        module.finalize(result, out_dir, quick)
    result["total_wall_time_s"] = time.perf_counter() - started
    result["workers"] = workers
    result = _json_safe(result)
    _write_json(json_path, result)
    table = markdown_table(result, module.TABLE)
    notes = list(module.notes(result)) if hasattr(module, "notes") else []
    md = [f"# {name}", "", module.CLAIM, "", table, ""]
    md += [f"- {line}" for line in notes]
    md += [
        "",
        f"{len(seeds)} seed(s) {seeds}; quick={quick}; commit {commit[:12]}{' (dirty)' if dirty else ''}; "
        f"total wall time {result['total_wall_time_s']:.0f} s.",
    ]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    plots = module.plot(result, out_dir)
    if verbose:
        print(f"\n## {name}: {module.CLAIM}\n\n{table}\n")
        for line in notes:
            print(f"- {line}")
        print(f"\nwrote {json_path}, {out_dir / (name + '.md')} and {', '.join(str(p) for p in plots)}")
    return result


def read_results(path: Path) -> dict:
    """The results JSON at ``path``: ValueError, one line naming the file, if it is torn or not one.

    The runner writes it atomically, so a torn file means an editor, a full disk or a copy went wrong;
    it is never overwritten by ``--resume``, which needs its runs.
    """
    fix = "repair it, or move it away to start over"
    try:
        result = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); {fix}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text, so not a results file; {fix}") from None
    except OSError as err:  # a folder of that name, no permission
        raise ValueError(f"cannot read {path}: {err.strerror}; {fix}") from None
    runs = result.get("runs") if isinstance(result, dict) else None
    if not isinstance(runs, list) or not all(
        isinstance(r, dict) and {"name", "seed", "config"} <= r.keys() for r in runs
    ):
        raise ValueError(
            f"{path} is not an experiment results file (no list of runs with name, seed and config); {fix}"
        )
    return result


def check_results_free(out_dir: str | Path, name: str, resume: bool, overwrite: bool) -> None:
    """ValueError unless ``out_dir/NAME.json`` is absent, or ``resume`` or ``overwrite`` (not both) says what to do."""
    if resume and overwrite:
        raise ValueError("--resume keeps the finished runs and --overwrite replaces them: pass only one")
    path = Path(out_dir) / f"{name}.json"
    if path.exists() and not (resume or overwrite):
        raise ValueError(
            f"{path} already holds results: pass --resume to continue them, --overwrite to replace them, "
            "or another --out"
        )


def _write_json(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    os.replace(tmp, path)
