"""Head to head: dense, MoE-2, MoE-8, PKM, PEER, UltraMem, UltraMemV2 (Specification §1-§5).

Two comparisons, said which each time (Specification §5):

- ``active``: every model activates the dense reference's parameters per token (the
  ``configs/shakespeare-*.yaml`` widths; MoE-2 = top-2 of 8 experts, MoE-8 = top-8 of 64
  fine-grained experts as [OLMoE], expert width fitted to the same activated count).
- ``total``: every model has MoE-8's total parameters. Sparse models keep their activated
  count and grow their tables (experts, or value slots N); the dense model can only grow its
  FFN, so it activates all of them.

Each model trains on tiny Shakespeare (validation loss, training and inference tokens/s on
one CPU thread) and, separately, on the ``facts`` task (exact-match accuracy of memorised
key -> value facts: capacity, the [PKM] / [UM] memory claim).

``finalize`` times a training step of every reference config interleaved in one process
(:mod:`minimem_tools.bench.step`: rounds of each model in turn, median per model), so the
UltraMemV2 / dense step ratio (the course's target: at most 1.25x) is measured under the same
load, and writes where the time goes (``head2head_profile.txt``: block-level forward +
backward times and the operator profile of both models' steps).
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from minimem_tools.experiments.runner import Variant, new_figure, save_figure, stat
from minimem_tools.experiments.setups import (
    MODELS,
    at_total,
    experiment_train,
    model_config,
    override,
    parameters,
    train_and_measure,
)

NAME = "head2head"
CLAIM = (
    "Memory layers vs dense and MoE at equal activated and at equal total parameters: tiny Shakespeare "
    "validation loss, fact memorisation, CPU tokens/s ([PKM] §4, [PEER] §3, [UM] §4, [UM2] §5; Specification §5)."
)
PARITIES = ("active", "total")
TASKS = ("shakespeare", "facts")
ANCHOR = "moe8"  # the equal-total comparison uses this model's total parameters

FULL = dict(steps=300, facts_steps=400, eval_iters=20)
QUICK = dict(steps=4, facts_steps=4, eval_iters=1)
FACTS = dict(n_facts=1024, key_len=3, value_len=2)  # capacity task: 1024 random 3-letter -> 2-digit facts
TIMING = dict(rounds=7, steps=5)  # finalize: 7 rounds x 5 steps per model, interleaved
QUICK_TIMING = dict(rounds=1, steps=1)

TABLE = [
    ("val_loss", ".3f"),
    ("exact_match", ".3f"),
    ("train_tokens_per_s", ",.0f"),
    ("infer_tokens_per_s", ",.0f"),
    ("params_activated", ",.0f"),
    ("params_total", ",.0f"),
]


def name_of(model: str, parity: str, task: str) -> str:
    """Run name; the anchor's equal-total run is its equal-active run (the same model, trained once)."""
    if model == ANCHOR and parity == "total":
        parity = "active"
    return f"{model}/{parity}/{task}"


@functools.lru_cache(maxsize=1)
def _parity_configs_json() -> str:
    active = {m: model_config(m) for m in MODELS}
    target = parameters(active[ANCHOR])["total"]
    out = []
    for m in MODELS:
        out.append([m, "active", active[m]])
        out.append([m, "total", active[m] if m == ANCHOR else at_total(m, active[m], target)])
    return json.dumps(out)


def parity_configs() -> dict[tuple[str, str], dict]:
    """(model, parity) -> model config (train section untouched); fitted once per process."""
    return {(m, p): c for m, p, c in json.loads(_parity_configs_json())}


def task_config(config: dict, task: str, quick: bool) -> dict:
    scale = QUICK if quick else FULL
    if task == "shakespeare":
        return experiment_train(config, scale["steps"], scale["eval_iters"])
    from minimem.data import get_dataset

    vocab = get_dataset("facts", config["model"]["block_size"], 0, **FACTS).vocab_size
    config = override(config, **{"model.vocab_size": vocab})
    return experiment_train(
        config, scale["facts_steps"], scale["eval_iters"], dataset="facts", dataset_args=dict(FACTS)
    )


def variants(quick: bool) -> list[Variant]:
    out = []
    for (model, parity), config in parity_configs().items():
        if model == ANCHOR and parity == "total":
            continue
        for task in TASKS:
            out.append(
                Variant(
                    name_of(model, parity, task),
                    task_config(config, task, quick),
                    labels={"model": model, "parity": parity, "task": task},
                )
            )
    order = {}
    for n in (name_of(m, p, t) for p in PARITIES for t in TASKS for m in MODELS):
        order.setdefault(n, len(order))
    return sorted(out, key=lambda v: order[v.name])


def run(variant: Variant, seed: int, quick: bool) -> dict:
    task = variant.labels["task"]
    metrics, _ = train_and_measure(variant.config, throughput=task == "shakespeare", exact_match=task == "facts")
    return metrics


# --------------------------------------------------------------------------- step timing and profile


def _fwd_bwd_ms(fn, x: torch.Tensor, reps: int) -> float:
    """Median ms of forward + backward of ``fn(x)`` (sum of its tensor outputs as the loss)."""
    times = []
    for i in range(reps + 1):
        x = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        out = fn(x)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs if o.is_floating_point()).backward()
        if i:  # the first call warms up
            times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def module_breakdown(config: dict, reps: int = 5) -> list[tuple[str, float]]:
    """Forward + backward ms of block 0's parts on one training batch of activations (B, T, h).

    For an UltraMemV2 block the memory is also split into its retrieval (queries, rank-wise
    sub-key scores, Tucker top-m: ``memory.retrieval``) and the rest (pre-value projection,
    fused lookup, output projection).
    """
    from minimem.config import config_from_dict
    from minimem.model import GPT

    cfg = config_from_dict(config, saved=True)  # a results file may hold an older saved config
    block = GPT(cfg.model).blocks[0]
    B, T, h = cfg.train.batch_size, cfg.model.block_size, cfg.model.n_embd
    x = torch.randn(B, T, h, generator=torch.Generator().manual_seed(0))
    rows = [
        ("attention (with its norm)", _fwd_bwd_ms(lambda v: block.attn(block.norm1(v)), x, reps)),
        (f"FFN ({type(block.ffn).__name__})", _fwd_bwd_ms(block.ffn, x, reps)),
    ]
    if block.memory is not None:
        memory = block.memory
        rows.append((f"memory ({type(memory).__name__}), total", _fwd_bwd_ms(memory, x, reps)))
        if hasattr(memory, "retrieval"):
            rows.append(
                (
                    "  of which retrieval (query, sub-key scores, top-m)",
                    _fwd_bwd_ms(lambda v: memory.retrieval(v.reshape(B * T, h))[0], x, reps),
                )
            )
    return rows


def inference_throughput(configs: dict[str, dict], rounds: int, reps: int) -> dict[str, dict]:
    """Forward tokens/s in eval mode of each config's model, timed interleaved (1 CPU thread).

    One batch of 12 x 64 tokens of tiny Shakespeare; every round times ``reps`` forward passes of
    every model in turn, so all models see the same load. Returns ``{name: {mean, std, n}}`` over
    the rounds. Fresh weights: a forward pass costs the same whatever their values.
    """
    from minimem.config import config_from_dict
    from minimem.model import GPT
    from minimem_tools.bench import step as bench_step
    from minimem_tools.experiments.runner import mean_std

    x, _ = bench_step.fixed_batch()
    models = {name: GPT(config_from_dict(cfg, saved=True).model).eval() for name, cfg in configs.items()}
    rates: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(x)  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    model(x)
                rates[name].append(reps * x.numel() / (time.perf_counter() - t0))
    return {name: mean_std(r) for name, r in rates.items()}


def finalize(result: dict, out_dir: Path, quick: bool) -> None:
    """Step time of the reference configs, interleaved (:mod:`minimem_tools.bench.step`), and where it goes."""
    import contextlib
    import io

    from minimem_tools.bench import step as bench_step

    timing = QUICK_TIMING if quick else TIMING
    torch.set_num_threads(1)
    batch = bench_step.fixed_batch()
    steppers = [bench_step.Stepper(kind, batch) for kind in bench_step.KINDS]
    timed = bench_step.time_round_robin(steppers, timing["steps"], timing["rounds"], warmup=1, desc="step timing")
    wall = {k: w for k, (w, _) in timed.items()}
    cpu = {k: c for k, (_, c) in timed.items()}
    result["step_time"] = {
        "what": "ms per training step of configs/shakespeare-*.yaml (equal activated parameters; batch 12 x 64; "
        f"1 CPU thread): median over {timing['rounds']} interleaved rounds of {timing['steps']} steps "
        "(minimem_tools.bench.step); cpu = the thread's CPU time, insensitive to other processes",
        "wall_ms": wall,
        "cpu_ms": cpu,
        "wall_ratio_to_dense": {k: w / wall["dense"] for k, w in wall.items()},
        "cpu_ratio_to_dense": {k: c / cpu["dense"] for k, c in cpu.items()},
        "load_average": os.getloadavg()[0],
    }
    shakespeare = {r["name"]: r["config"] for r in result["runs"] if r["labels"]["task"] == "shakespeare"}
    result["inference_tokens_per_s"] = inference_throughput(shakespeare, timing["rounds"], timing["steps"])
    result["inference_tokens_per_s"]["what"] = (
        "forward tokens/s in eval mode, batch 12 x 64, 1 CPU thread, every shakespeare run's model timed "
        f"interleaved: mean ± std over {timing['rounds']} rounds of {timing['steps']} passes"
    )
    configs = {
        r["labels"]["model"]: r["config"]
        for r in result["runs"]
        if r["labels"]["parity"] == "active" and r["labels"]["task"] == "shakespeare"
    }
    profile = [f"# Where a training step's time goes ({'quick' if quick else 'full'} run, 1 CPU thread)", ""]
    for model in ("dense", "ultramemv2"):
        breakdown = module_breakdown(configs[model], reps=1 if quick else 5)
        result["step_time"].setdefault("block0_fwd_bwd_ms", {})[model] = dict(breakdown)
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            bench_step.print_profile(
                model, steps=1 if quick else 3, rows=20, against=None if model == "dense" else "dense"
            )
        profile += [
            f"## {model}: {wall[model]:.1f} ms per step (wall), {cpu[model]:.1f} ms (thread CPU)",
            "",
            "Block 0, forward + backward on one batch of activations (median ms; x n_layer blocks per step):",
            "",
        ]
        profile += [f"    {part:<55} {t:8.2f} ms" for part, t in breakdown]
        profile += [
            "",
            "Operators of whole training steps (minimem bench step --profile):",
            "",
            captured.getvalue(),
            "",
        ]
    (out_dir / f"{NAME}_profile.txt").write_text("\n".join(profile) + "\n")


def notes(result: dict) -> list[str]:
    from minimem_tools.bench import step as bench_step

    lines = []
    st = result.get("step_time")
    if st:
        ratio, cpu_ratio = st["wall_ratio_to_dense"]["ultramemv2"], st["cpu_ratio_to_dense"]["ultramemv2"]
        verdict = "meets" if ratio <= bench_step.TARGET_RATIO else "misses"
        lines.append(
            f"UltraMemV2 / dense CPU training step time at equal activated parameters: {ratio:.2f}x wall, "
            f"{cpu_ratio:.2f}x thread CPU ({st['wall_ms']['ultramemv2']:.1f} ms vs {st['wall_ms']['dense']:.1f} ms; "
            f"{verdict} the {bench_step.TARGET_RATIO}x target; load average {st['load_average']:.1f}). "
            "All configs (wall): " + ", ".join(f"{m} {r:.2f}x" for m, r in st["wall_ratio_to_dense"].items())
        )
    for parity in PARITIES:
        losses = {m: stat(result, name_of(m, parity, "shakespeare"), "val_loss") for m in MODELS}
        finite = {m: s for m, s in losses.items() if not math.isnan(s[0])}
        if finite:
            best = min(finite, key=lambda m: finite[m][0])
            order = sorted(finite, key=lambda m: finite[m][0])
            lines.append(
                f"equal {parity} parameters, validation loss order (best first): {' < '.join(order)}; "
                f"best {best} {finite[best][0]:.3f}"
            )
        accs = {m: stat(result, name_of(m, parity, "facts"), "exact_match") for m in MODELS}
        finite = {m: s for m, s in accs.items() if not math.isnan(s[0])}
        if finite:
            order = sorted(finite, key=lambda m: -finite[m][0])
            lines.append(f"equal {parity} parameters, facts exact match order (best first): {' > '.join(order)}")
    return lines


STEP_KIND = {"moe2": "moe"}  # minimem_tools.bench.step times configs/shakespeare-moe.yaml (MoE-2) as "moe"


def speed(result: dict, model: str, parity: str, metric: str) -> tuple[float, float, int]:
    """Clean speed figures from :func:`finalize` (interleaved timing), like :func:`stat`.

    ``train_tokens_per_s``: tokens per training step over the step time (equal-active configs only);
    ``infer_tokens_per_s``: :func:`inference_throughput`. NaN where finalize did not time the model
    (MoE-8 has no step timing): the runs' own figures were measured under load and are not shown.
    """
    name = name_of(model, parity, "shakespeare")
    if metric == "infer_tokens_per_s" and name in result.get("inference_tokens_per_s", {}):
        s = result["inference_tokens_per_s"][name]
        return s["mean"], s["std"], s["n"]
    step = result.get("step_time", {}).get("wall_ms", {})
    kind = STEP_KIND.get(model, model)
    if metric == "train_tokens_per_s" and parity == "active" and kind in step:
        return 12 * 64 / (step[kind] / 1000), 0.0, 1
    return math.nan, math.nan, 0


def plot(result: dict, out_dir: Path) -> list[Path]:
    metrics = [
        ("val_loss", "shakespeare", "validation loss (tiny Shakespeare)"),
        ("exact_match", "facts", "facts exact match"),
        ("train_tokens_per_s", "shakespeare", "training tokens/s (1 CPU thread, interleaved)"),
        ("infer_tokens_per_s", "shakespeare", "inference tokens/s (1 CPU thread, interleaved)"),
    ]
    fig, axes = new_figure(ncols=len(metrics), width=4.2, height=3.6)
    width = 0.4
    for ax, (metric, task, title) in zip(axes, metrics):
        for k, parity in enumerate(PARITIES):
            if metric.endswith("_per_s"):
                stats = [speed(result, m, parity, metric) for m in MODELS]
            else:
                stats = [stat(result, name_of(m, parity, task), metric) for m in MODELS]
            pos = [i + (k - 0.5) * width for i in range(len(MODELS))]
            ax.bar(
                pos, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=2, label=f"equal {parity} params"
            )
        ax.set_xticks(range(len(MODELS)))
        ax.set_xticklabels(MODELS, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if metric == "val_loss":
            finite = [stat(result, name_of(m, p, task), metric)[0] for m in MODELS for p in PARITIES]
            finite = [v for v in finite if not math.isnan(v)]
            if finite:
                ax.set_ylim(min(finite) - 0.05, max(finite) + 0.05)
    axes[0].legend(fontsize=7)
    return save_figure(fig, out_dir, NAME)
