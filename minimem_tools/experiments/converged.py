"""The head-to-head at a converged budget, and a scaling curve (issue: experiments that decide).

``head2head`` trains every model for 300 steps, where the runs end near validation loss 2.05-2.12
and the dense reference is still falling fast (it reaches about 1.78 at 1,000 steps): a budget
too short to decide anything. Here a smaller grid runs 1,000 steps (the reference configs'
learning-rate schedule compressed to 1,000 steps, warmup 10%), every model at the dense
reference's activated parameters (``configs/shakespeare-*.yaml``), evaluated on 40 validation
batches at steps 250, 500, 750 and 1,000 (the learning curve):

- ``dense``, ``moe8`` (top-8 of 64 fine-grained experts, [OLMoE] in miniature), ``pkm``,
  ``ultramem`` and ``ultramemv2``: the head-to-head of [PKM] §4, [UM] §4 and [UM2] §5.
  MoE-2 and PEER stay in the 300-step ``head2head`` only (the machine's budget: 2 CPU cores).
- ``ultramemv2`` with N = 256, 1,024 (the reference) and 4,096 slots per layer, everything else
  fixed: validation loss against total memory parameters at fixed activated parameters, the
  scaling curve of [UM] §4 / [UM2] §5 (more total values at the same compute should help).
"""

from __future__ import annotations

import math
from pathlib import Path

from minimem_tools.experiments.runner import Variant, curve, errorbar, new_figure, save_figure, stat
from minimem_tools.experiments.setups import dataset_of, experiment_train, model_config, override, train_and_measure

NAME = "converged"
CLAIM = (
    "Memory layers vs dense and a fine-grained MoE at equal activated parameters after 1,000 steps, "
    "and UltraMemV2's validation loss against its table size ([PKM] §4, [UM] §4, [UM2] §5)."
)
MODELS = ("dense", "moe8", "pkm", "ultramem", "ultramemv2")
SLOTS = (256, 1024, 4096)  # UltraMemV2 slots per layer on the scaling curve (1,024 = the reference config)
REFERENCE_SLOTS = 1024
FULL = dict(steps=1000, eval_iters=40, eval_interval=250)
QUICK = dict(steps=4, eval_iters=1, eval_interval=2)
TABLE = [
    ("val_loss", ".3f"),
    ("val_loss_500", ".3f"),
    ("train_loss", ".3f"),
    ("params_activated", ",.0f"),
    ("params_total", ",.0f"),
]


def name_of(model: str, n_slots: int | None = None) -> str:
    """``model`` at the reference config, or ``ultramemv2/N=...`` on the scaling curve."""
    return model if n_slots in (None, REFERENCE_SLOTS) else f"{model}/N={n_slots}"


def variants(quick: bool) -> list[Variant]:
    scale = QUICK if quick else FULL

    def train(config: dict) -> dict:
        return experiment_train(config, scale["steps"], scale["eval_iters"], eval_interval=scale["eval_interval"])

    out = [Variant(name_of(m), train(model_config(m)), labels={"model": m}) for m in MODELS]
    for n_slots in SLOTS:
        if n_slots != REFERENCE_SLOTS:
            config = override(model_config("ultramemv2"), **{"model.memory.n_slots": n_slots})
            out.append(Variant(name_of("ultramemv2", n_slots), train(config), labels={"model": "ultramemv2"}))
    return out


SAMPLE = dict(prompt="ROMEO:\n", tokens=240, temperature=0.8, top_k=20)  # chapter 8 prints these


def run(variant: Variant, seed: int, quick: bool) -> dict:
    metrics, model = train_and_measure(variant.config)
    if model is not None:  # a text sample from the trained model (a string: kept, not averaged)
        metrics["sample"] = sample_text(model, variant.config, seed, SAMPLE["tokens"] if not quick else 8)
    return metrics


def sample_text(model, config: dict, seed: int, tokens: int) -> str:
    """``tokens`` characters sampled after :data:`SAMPLE`'s prompt (KV cache, fixed generator)."""
    import torch

    from minimem.generate import generate

    tokenizer = dataset_of(config).tokenizer
    idx = torch.tensor([tokenizer.encode(SAMPLE["prompt"])])
    gen = torch.Generator().manual_seed(seed)
    out = generate(model, idx, tokens, SAMPLE["temperature"], SAMPLE["top_k"], generator=gen)
    return tokenizer.decode(out[0])


def scaling_names() -> list[str]:
    return [name_of("ultramemv2", n) for n in SLOTS]


def notes(result: dict) -> list[str]:
    lines = []
    losses = {m: stat(result, m, "val_loss") for m in MODELS}
    finite = {m: s for m, s in losses.items() if not math.isnan(s[0])}
    if finite:
        order = sorted(finite, key=lambda m: finite[m][0])
        lines.append(
            "validation loss after 1,000 steps, best first: "
            + ", ".join(f"{m} {finite[m][0]:.3f} ± {finite[m][1]:.3f}" for m in order)
        )
    curve = [
        (n, stat(result, name, "val_loss"), stat(result, name, "params_total")[0])
        for n, name in zip(SLOTS, scaling_names())
    ]
    if all(not math.isnan(s[0]) for _, s, _ in curve):
        lines.append(
            "UltraMemV2 scaling curve (slots N per layer: total parameters, validation loss): "
            + "; ".join(f"N={n}: {p:,.0f}, {s[0]:.3f} ± {s[1]:.3f}" for n, s, p in curve)
        )
    return lines


def plot(result: dict, out_dir: Path) -> list[Path]:
    fig, (ax_bar, ax_curve, ax_scale) = new_figure(ncols=3, width=4.2, height=3.6)
    stats = [stat(result, m, "val_loss") for m in MODELS]
    ax_bar.bar(range(len(MODELS)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3)
    ax_bar.set_xticks(range(len(MODELS)))
    ax_bar.set_xticklabels(MODELS, rotation=45, ha="right", fontsize=8)
    finite = [s[0] for s in stats if not math.isnan(s[0])]
    if finite:
        ax_bar.set_ylim(min(finite) - 0.03, max(finite) + 0.03)
    ax_bar.set_title("validation loss at 1,000 steps (equal activated)", fontsize=9)
    steps = sorted(
        {int(k.rsplit("_", 1)[1]) for r in result["runs"] for k in r["metrics"] if k[9:].isdigit()}
        | {r["config"]["train"]["max_steps"] for r in result["runs"]}
    )
    for m in MODELS:
        curve(ax_curve, result, m, ["val_loss" if s == steps[-1] else f"val_loss_{s}" for s in steps], steps, m)
    ax_curve.set_xlabel("training step")
    ax_curve.set_ylabel("validation loss")
    ax_curve.legend(fontsize=7)
    ax_curve.set_title("learning curves (mean ± std over seeds)", fontsize=9)
    names = scaling_names()
    totals = [stat(result, n, "params_total")[0] for n in names]
    errorbar(ax_scale, result, names, "val_loss", totals, label="UltraMemV2 (N = 256, 1,024, 4,096)")
    dense = stat(result, "dense", "val_loss")
    if not math.isnan(dense[0]):
        ax_scale.axhline(dense[0], color="grey", linestyle="--", label="dense (same activated)")
    ax_scale.set_xscale("log")
    ax_scale.set_xlabel("total parameters (activated fixed)")
    ax_scale.set_ylabel("validation loss")
    ax_scale.legend(fontsize=7)
    ax_scale.set_title("loss against table size", fontsize=9)
    return save_figure(fig, out_dir, NAME)
