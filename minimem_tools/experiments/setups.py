"""What the experiments train and how they measure it.

- The compared models (Specification §5): ``dense``, ``moe2`` (top-2 of 8 experts), ``moe8`` (top-8
  of 64 fine-grained experts, [OLMoE] scaled down), ``pkm``, ``peer``, ``ultramem``,
  ``ultramemv2``, each from ``configs/shakespeare-*.yaml``, whose widths are chosen so that
  every model activates the dense reference's parameters per token (the files say how).
  :func:`match_parameters` moves one integer knob of a config until its total or activated
  parameter count (:func:`minimem.accounting.count_parameters`) is as close as it gets to a
  target, so the equal-total comparison is built from the same files.
- :func:`train_run` trains one config with :func:`minimem.train.train` in a scratch folder
  and returns the trained model and the ``metrics.jsonl`` records.
- Throughput: training tokens/s is the median over logging intervals of the trainer's own
  measurement (evaluation excluded); inference tokens/s times forward passes in eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from minimem.config import config_from_dict
from minimem_tools import course

CONFIG_DIR = course.path("configs")
MODELS = ("dense", "moe2", "moe8", "pkm", "peer", "ultramem", "ultramemv2")
MOE_SHAPES = {"moe2": (8, 2), "moe8": (64, 8)}  # (experts E, top-k): MoE-2 and OLMoE's 64 / top-8
CONFIG_FILES = {m: f"shakespeare-{m}.yaml" for m in ("dense", "pkm", "peer", "ultramem", "ultramemv2")}
CONFIG_FILES.update(moe2="shakespeare-moe.yaml", moe8="shakespeare-moe.yaml")


# --------------------------------------------------------------------------- configs


def load_yaml(name: str) -> dict:
    path = CONFIG_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"experiment config {path} is missing")
    return yaml.safe_load(path.read_text()) or {}


def full_config(data: dict) -> dict:
    """Validate a (partial) config dict and return the complete one (every field filled)."""
    return config_from_dict(copy.deepcopy(data)).to_dict()


def get(config: dict, path: str):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def set_path(config: dict, path: str, value) -> dict:
    """A copy of ``config`` with the dotted field ``path`` set to ``value`` (the field must exist)."""
    out = copy.deepcopy(config)
    node = out
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    if last not in node:
        raise ValueError(f"unknown config field {path!r}")
    node[last] = value
    return out


def override(config: dict, **fields) -> dict:
    """``override(cfg, **{"model.memory.topk": 32})``: several :func:`set_path` at once, validated."""
    for path, value in fields.items():
        config = set_path(config, path, value)
    return full_config(config)


def parameters(config: dict) -> dict:
    """``count_parameters`` of the model ``config`` describes: total, activated, by part."""
    from minimem.accounting import count_parameters

    return count_parameters(config_from_dict(copy.deepcopy(config)).model)


def model_config(model: str) -> dict:
    """Full config of ``model`` (one of :data:`MODELS`) at the dense reference's activated parameters."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    config = full_config(load_yaml(CONFIG_FILES[model]))
    if model in MOE_SHAPES:
        experts, top_k = MOE_SHAPES[model]
        reference = parameters(model_config("dense"))["activated"]
        config = override(
            config,
            **{
                "model.ffn": "moe",
                "model.moe.n_experts": experts,
                "model.moe.top_k": top_k,
                "model.moe.d_expert": max(1, get(config, "model.ffn_hidden") // top_k),
            },
        )
        config = match_parameters(
            config, "model.moe.d_expert", reference, "activated", start=get(config, "model.moe.d_expert")
        )
    return config


def match_parameters(
    config: dict,
    knob: str,
    target: int,
    count: str = "total",
    to_value: Callable[[int], int] = lambda k: k,
    low: int = 1,
    high: int = 1 << 20,
    start: Optional[int] = None,
) -> dict:
    """The config whose ``count`` ("total" or "activated") parameters are closest to ``target``.

    The knob's value is ``to_value(k)`` for an integer k in [low, high] (e.g. ``k * k`` for
    ``model.memory.n_slots``, which must be a perfect square); the count must grow with k.
    Parameter counts are affine in the widths and nearly so in the slots, so a secant search
    from ``start`` (default ``low``) lands next to the answer in a few model builds; a walk to
    the closer neighbour then finishes it.
    """
    if count not in ("total", "activated"):
        raise ValueError(f"count must be 'total' or 'activated', got {count!r}")
    if not low <= high:
        raise ValueError(f"need low <= high, got low={low}, high={high}")
    cache: dict[int, int] = {}

    def measure(k: int) -> int:
        if k not in cache:
            cache[k] = parameters(set_path(config, knob, to_value(k)))[count]
        return cache[k]

    clamp = lambda k: max(low, min(high, k))
    a = clamp(start if start is not None else low)
    b = clamp(a + max(1, a // 4)) if a < high else clamp(a - max(1, a // 4))
    for _ in range(8):  # secant steps on the (nearly) affine count
        fa, fb = measure(a), measure(b)
        if fa == fb:
            break
        k = clamp(round(b + (target - fb) * (b - a) / (fb - fa)))
        if k in (a, b):
            break
        a, b = b, k
    best = min(cache, key=lambda k: (abs(cache[k] - target), k))
    while True:  # walk to the closer neighbour while it is closer
        moves = [k for k in (best - 1, best + 1) if low <= k <= high]
        nxt = min(moves, key=lambda k: abs(measure(k) - target), default=best)
        if abs(measure(nxt) - target) >= abs(measure(best) - target):
            break
        best = nxt
    return full_config(set_path(config, knob, to_value(best)))


# Which knob grows a model's total parameters at (nearly) fixed activated parameters.
TOTAL_KNOBS = {
    "dense": ("model.ffn_hidden", lambda k: k),  # dense: more total means more activated too
    "moe2": ("model.moe.n_experts", lambda k: k),
    "moe8": ("model.moe.n_experts", lambda k: k),
    "pkm": ("model.memory.n_slots", lambda k: k * k),
    "peer": ("model.memory.n_slots", lambda k: k * k),
    "ultramem": ("model.memory.n_slots", lambda k: k * k),
    "ultramemv2": ("model.memory.n_slots", lambda k: k * k),
}


# Which knob restores the activated parameters when the total knob moved them (sub-keys and
# routers grow with the table): the dense FFN width of memory models, the expert width of MoEs.
ACTIVE_KNOBS = {
    "moe2": "model.moe.d_expert",
    "moe8": "model.moe.d_expert",
    "pkm": "model.ffn_hidden",
    "peer": "model.ffn_hidden",
    "ultramem": "model.ffn_hidden",
    "ultramemv2": "model.ffn_hidden",
}


def at_total(model: str, config: dict, target: int, rounds: int = 3) -> dict:
    """``config`` of ``model`` grown to ``target`` total parameters with its :data:`TOTAL_KNOBS`.

    Sparse models alternate: fit the total with the table size, then restore the original
    activated count with :data:`ACTIVE_KNOBS` (``rounds`` times; it settles in two). The dense
    model has no such freedom: its activated count grows with its total.
    """
    knob, to_value = TOTAL_KNOBS[model]
    low = 1
    if knob == "model.memory.n_slots":
        low = get(config, "model.memory.topk")  # n >= m
    elif knob == "model.moe.n_experts":
        low = get(config, "model.moe.top_k")
    activated = parameters(config)["activated"]
    for _ in range(rounds if model in ACTIVE_KNOBS else 1):
        current = get(config, knob)
        config = match_parameters(
            config,
            knob,
            target,
            "total",
            to_value,
            low=low,
            start=math.isqrt(current) if knob == "model.memory.n_slots" else current,
        )
        if model in ACTIVE_KNOBS:
            config = match_parameters(
                config, ACTIVE_KNOBS[model], activated, "activated", start=get(config, ACTIVE_KNOBS[model])
            )
    return config


# --------------------------------------------------------------------------- training


def experiment_train(config: dict, steps: int, eval_iters: int = 20, **train_fields) -> dict:
    """``config`` set up for an experiment run: ``steps`` steps, one final evaluation, 1 thread.

    Warmup is 10% of the steps (at most the config's); logging every ~5% of the run so that
    the median training throughput has about 20 intervals.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    fields = {
        "train.max_steps": steps,
        "train.warmup_steps": min(get(config, "train.warmup_steps"), max(1, steps // 10)),
        "train.eval_interval": steps,
        "train.ckpt_interval": steps,
        "train.eval_iters": eval_iters,
        "train.log_interval": max(1, steps // 20),
        "train.threads": 1,
        "train.device": "cpu",
    }
    fields.update({f"train.{k}": v for k, v in train_fields.items()})
    return override(config, **fields)


def train_run(config: dict, progress: bool = False):
    """Train ``config`` in a scratch folder: ``(TrainResult, records)`` (the trainer's prints muted).

    Raises :class:`minimem.train.TrainingDiverged` when the loss becomes non-finite; the
    records written until then are attached to the exception as ``err.records``.
    """
    from minimem.train import METRICS_FILE, TrainingDiverged, train

    with tempfile.TemporaryDirectory(prefix="minimem-experiment-") as tmp:
        cfg = config_from_dict(set_path(config, "train.out_dir", tmp))
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the trainer's start / end lines
                result = train(cfg, progress=progress)
        except TrainingDiverged as err:
            err.records = _read_records(Path(tmp) / METRICS_FILE)
            raise
        return result, _read_records(Path(tmp) / METRICS_FILE)


def _read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_tokens_per_s(records: list[dict]) -> float:
    """Median of the trainer's per-interval tokens/s (first interval, with its warm-up, left out)."""
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    if len(rates) > 1:
        rates = rates[1:]
    return statistics.median(rates) if rates else math.nan


@torch.no_grad()
def inference_tokens_per_s(model, dataset, batch_size: int, reps: int = 5, seed: int = 0) -> float:
    """Forward-only tokens/s on a (batch_size, block_size) validation batch: median of ``reps`` timings."""
    gen = torch.Generator().manual_seed(seed)
    x, _ = dataset.get_batch("val", batch_size, gen)
    was_training = model.training
    model.eval()
    try:
        model(x)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return x.numel() / statistics.median(times)


def dataset_of(config: dict):
    """The dataset a config trains on (the same object ``train`` builds)."""
    from minimem.data import get_dataset

    t = config["train"]
    return get_dataset(t["dataset"], config["model"]["block_size"], t["seed"], **t["dataset_args"])


def train_and_measure(config: dict, throughput: bool = False, exact_match: bool = False) -> tuple[dict, object]:
    """Train ``config``; metrics: final train / val loss, parameters, optional throughput and exact match.

    A run whose loss becomes non-finite is reported, not raised: ``diverged = 1`` and NaN losses.
    Returns ``(metrics, trained model or None)``.
    """
    from minimem.accounting import count_parameters
    from minimem.train import TrainingDiverged

    metrics = {}
    try:
        result, records = train_run(config)
    except TrainingDiverged as err:
        counts = parameters(config)
        metrics.update(
            params_total=counts["total"],
            params_activated=counts["activated"],
            diverged=1,
            train_loss=math.nan,
            val_loss=math.nan,
            diverged_at_step=_step_of(err),
        )
        if exact_match:
            metrics["exact_match"] = 0.0
        return metrics, None
    counts = count_parameters(result.model)
    metrics.update(
        params_total=counts["total"],
        params_activated=counts["activated"],
        diverged=0,
        train_loss=result.train_loss,
        val_loss=result.val_loss,
    )
    if not all(math.isfinite(v) for v in (result.train_loss, result.val_loss)):
        metrics["diverged"] = 1
    for record in records:  # the learning curve, when the run evaluates before its last step
        if "val_loss" in record and record["step"] < result.steps:
            metrics[f"val_loss_{record['step']}"] = record["val_loss"]
    if exact_match:  # the trainer scores exact match at its final evaluation
        scored = [r["exact_match"] for r in records if "exact_match" in r]
        metrics["exact_match"] = scored[-1] if scored else dataset_of(config).evaluate(result.model)["exact_match"]
    if throughput:
        tps = train_tokens_per_s(records)
        metrics["train_tokens_per_s"] = tps
        metrics["train_step_ms"] = 1000.0 * config["train"]["batch_size"] * config["model"]["block_size"] / tps
        metrics["infer_tokens_per_s"] = inference_tokens_per_s(
            result.model, dataset_of(config), config["train"]["batch_size"]
        )
    return metrics, result.model


def _step_of(err: Exception) -> float:
    import re

    found = re.search(r"at step (\d+)", str(err))
    return float(found.group(1)) if found else math.nan
