"""Memory access: distinct experts or value rows one decoding step touches, against batch size B (Specification §3).

[UM] §3: a MoE layer reads the weights of every distinct expert the batch routes to; a
memory layer reads only the distinct value rows, at most min(B H m, N). Here, from real
routing: each model (MoE-2, MoE-8, PKM, UltraMemV2 at the dense reference's activated
parameters) trains briefly on tiny Shakespeare, then B validation windows of full context
go through it and the routing of their *last* position (one decoding step for B sequences)
is counted: distinct experts / rows per layer, averaged over layers. Beside it, the analytic
model of :mod:`minimem.accounting`: the bound min(B k, E) or min(B H m, N) and the
expectation under uniform access. Bytes per token: the weights a step reads (dense part,
plus the distinct experts or rows measured) over B, against the uniform-access expectation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minimem_tools.experiments.runner import Variant, new_figure, save_figure, stat
from minimem_tools.experiments.setups import experiment_train, model_config, train_and_measure

NAME = "memory_access"
CLAIM = (
    "A memory layer touches at most min(B m, N) value rows per step while a MoE touches whole experts, "
    "so its weight traffic per token falls faster with the batch ([UM] §3, Specification §3)."
)
MODELS = ("moe2", "moe8", "pkm", "ultramemv2")
BATCHES = (1, 4, 16, 64, 256, 1024)
FULL = dict(steps=200, eval_iters=10, batches=BATCHES)
QUICK = dict(steps=2, eval_iters=1, batches=(1, 16))
TABLE = [(f"distinct_B{b}", ".1f") for b in BATCHES] + [(f"touched_fraction_B{BATCHES[-1]}", ".3f")]


def variants(quick: bool) -> list[Variant]:
    scale = QUICK if quick else FULL
    return [
        Variant(
            m,
            experiment_train(model_config(m), scale["steps"], scale["eval_iters"]),
            labels={"model": m},
            task={"batches": list(scale["batches"])},
        )
        for m in MODELS
    ]


def routed_units(model) -> list[tuple[torch.Tensor, int, int, int]]:
    """Per routed layer: (ids of the last forward (B, T, r), population, reads per token, bytes per unit)."""
    from minimem.accounting import access_structure, memory_modules, moe_modules

    s = access_structure(model)
    out = []
    for module, layer in zip(moe_modules(model), s.moe):
        ids = module.last_indices
        out.append((ids, layer.n_experts, layer.top_k, layer.per_expert * 4))
    for module, layer in zip(memory_modules(model), s.memory):
        if layer.table is None:
            continue
        out.append((module.last_indices, layer.table.rows, layer.table.reads_per_token, layer.table.width * 4))
    return out


@torch.no_grad()
def measure_access(model, dataset, batch: int, seed: int) -> dict:
    """Distinct units touched by the last position of ``batch`` validation windows, per layer and in bytes."""
    from minimem.accounting import access_structure, bytes_read, expected_distinct

    gen = torch.Generator().manual_seed(seed)
    x, _ = dataset.get_batch("val", batch, gen)
    model.eval()
    model(x)
    B, T = x.shape
    distinct, population, bound, uniform, unit_bytes = [], [], [], [], 0.0
    for ids, pop, reads, width_bytes in routed_units(model):
        last = ids.reshape(B, T, -1)[:, -1]  # the decoding step: one token per sequence
        d = int(last.unique().numel())
        distinct.append(d)
        population.append(pop)
        bound.append(min(B * reads, pop))
        uniform.append(expected_distinct(pop, reads, B))
        unit_bytes += d * width_bytes
    analytic = bytes_read(model, B)
    dense = access_structure(model).dense * 4
    mean = lambda v: sum(v) / len(v)
    return {
        "distinct": mean(distinct),
        "population": mean(population),
        "bound": mean(bound),
        "uniform": mean(uniform),
        "touched_fraction": mean([d / p for d, p in zip(distinct, population)]),
        "bytes_per_token": (dense + unit_bytes) / B,
        "uniform_bytes_per_token": analytic["expected_per_token"],
    }


def run(variant: Variant, seed: int, quick: bool) -> dict:
    from minimem_tools.experiments.setups import dataset_of

    metrics, model = train_and_measure(variant.config)
    dataset = dataset_of(variant.config)
    for b in variant.task["batches"]:
        for key, value in measure_access(model, dataset, b, seed=1000 + seed).items():
            metrics[f"{key}_B{b}"] = value
    return metrics


def plot(result: dict, out_dir: Path) -> list[Path]:
    fig, (ax_d, ax_f, ax_b) = new_figure(ncols=3, width=4.4)
    batches = sorted({int(k.split("_B")[-1]) for e in result["summary"] for k in e if k.startswith("distinct_B")})
    for i, entry in enumerate(result["summary"]):
        name, color = entry["name"], f"C{i}"
        measured = [stat(result, name, f"distinct_B{b}") for b in batches]
        ax_d.errorbar(
            batches,
            [m[0] for m in measured],
            yerr=[m[1] for m in measured],
            marker="o",
            capsize=3,
            color=color,
            label=f"{name} measured",
        )
        ax_d.plot(batches, [stat(result, name, f"uniform_B{b}")[0] for b in batches], "--", color=color, alpha=0.7)
        ax_d.plot(batches, [stat(result, name, f"bound_B{b}")[0] for b in batches], ":", color=color, alpha=0.7)
        frac = [stat(result, name, f"touched_fraction_B{b}") for b in batches]
        ax_f.errorbar(
            batches, [f[0] for f in frac], yerr=[f[1] for f in frac], marker="o", capsize=3, color=color, label=name
        )
        byt = [stat(result, name, f"bytes_per_token_B{b}") for b in batches]
        ax_b.errorbar(
            batches,
            [b[0] for b in byt],
            yerr=[b[1] for b in byt],
            marker="o",
            capsize=3,
            color=color,
            label=f"{name} measured",
        )
        ax_b.plot(
            batches,
            [stat(result, name, f"uniform_bytes_per_token_B{b}")[0] for b in batches],
            "--",
            color=color,
            alpha=0.7,
        )
    for ax in (ax_d, ax_f, ax_b):
        ax.set_xscale("log")
        ax.set_xlabel("sequences decoded together B (tokens per step)")
        ax.grid(True, which="both", alpha=0.3)
    ax_d.set_yscale("log")
    ax_d.set_ylabel("distinct experts / value rows per layer")
    ax_d.set_title("measured (solid), uniform expectation (dashed), bound (dotted)", fontsize=8)
    ax_d.legend(fontsize=7)
    ax_f.set_ylabel("fraction of the layer's experts / rows touched")
    ax_f.set_title("share of the table read by one step", fontsize=8)
    ax_b.set_yscale("log")
    ax_b.set_ylabel("bytes of weights read per token (fp32)")
    ax_b.set_title("weights read per token: measured (solid), uniform (dashed)", fontsize=8)
    return save_figure(fig, out_dir, NAME)


def notes(result: dict) -> list[str]:
    lines = []
    b = max(int(k.split("_B")[-1]) for e in result["summary"] for k in e if k.startswith("distinct_B"))
    for entry in result["summary"]:
        name = entry["name"]
        d, u = stat(result, name, f"distinct_B{b}"), stat(result, name, f"uniform_B{b}")
        f = stat(result, name, f"touched_fraction_B{b}")
        lines.append(
            f"{name} at B={b}: {d[0]:.1f} distinct per layer (uniform access {u[0]:.1f}), "
            f"{100 * f[0]:.1f}% of the layer touched"
        )
    return lines
