"""UltraMemV2 ablations: undo each of its five changes in turn ([UM2] §4, Specification §4).

Baseline: ``configs/shakespeare-ultramemv2.yaml``. Variants that change the activated
parameters (fewer memory layers, a different D_k, two heads) get their FFN width refitted
so that every variant activates the baseline's parameters per token (the compute
rebalancing of change 5 is exactly this trade: a wider D_k costs FFN width).

1. memory every block vs a few: ``memory.layers = [1, 3]``, each of the two tables with twice
   the slots (rounded to a perfect square), so they hold the baseline's value parameters;
2. single vs per-block projection: ``memory.value_projections = 4``, UltraMem's implicit value
   expansion with E = 4 projections (the key grid addresses 4 N virtual slots);
3. pre-values vs plain values: ``memory.pre_values = false`` (o = W^T sum_i s_i V_i, its own
   principled std); and the gate activation the paper dropped (``activation = gelu``, Specification §4.3);
   these three switches belong to ``kind: ultramemv2-ablation`` (:mod:`minimem_tools.experiments.ultramemv2_ablation`);
4. principled vs std-0.02 init (and the printed sigma_V^2 formula, ``value_init = paper``);
5. D_k = h/2 vs smaller (h/4) and larger (h); one head vs two heads with half D_k and m
   ([UM2]: one head with doubled D_k and m beat two heads).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from minimem_tools.experiments.runner import Variant, bar_chart, new_figure, save_figure, stat
from minimem_tools.experiments.setups import (
    experiment_train,
    get,
    match_parameters,
    model_config,
    override,
    parameters,
    train_and_measure,
)
from minimem_tools.experiments.ultramemv2_ablation import UltraMemV2AblationConfig

NAME = "ablations"
CLAIM = (
    "UltraMemV2's five changes each help: memory in every block, one projection, pre-values, "
    "principled init, D_k = h/2 ([UM2] §4, Table 6-9)."
)
FULL = dict(steps=300, eval_iters=20)
QUICK = dict(steps=3, eval_iters=1)
TABLE = [("val_loss", ".3f"), ("train_loss", ".3f"), ("params_activated", ",.0f"), ("params_total", ",.0f")]
BASELINE = "ultramemv2"
NOT_RUN: dict[str, str] = {}  # every change has its variant


def with_switches(config: dict) -> dict:
    """``config`` (an UltraMemV2 config dict) as kind ``ultramemv2-ablation``, its switches at their defaults."""
    out = copy.deepcopy(config)
    defaults = UltraMemV2AblationConfig()
    out["model"]["memory"].update(
        kind=defaults.kind,
        activation=defaults.activation,
        pre_values=defaults.pre_values,
        value_projections=defaults.value_projections,
    )
    return out


def refit(base: dict, config: dict) -> dict:
    """``config`` with its FFN width refitted to the baseline's activated parameters."""
    target = parameters(base)["activated"]
    return match_parameters(config, "model.ffn_hidden", target, "activated", start=get(config, "model.ffn_hidden"))


def ablation_configs() -> dict[str, tuple[str, dict]]:
    """name -> (which change it undoes, model config)."""
    base = model_config(BASELINE)
    h, n_layer = get(base, "model.n_embd"), get(base, "model.n_layer")
    few = [1, 3] if n_layer >= 4 else [n_layer - 1]
    # the few tables together hold the baseline's value rows: N' ~ N L / len(few), a perfect square
    rows = get(base, "model.memory.n_slots") * n_layer / len(few)
    few_slots = round(math.sqrt(rows)) ** 2
    d_key = get(base, "model.memory.d_key") or h // 2
    topk = get(base, "model.memory.topk")
    out = {
        "baseline": ("none", base),
        "few_layers": (
            "1: memory every block",
            refit(base, override(base, **{"model.memory.layers": few, "model.memory.n_slots": few_slots})),
        ),
        "per_block_projections": (
            "2: one projection",
            refit(base, override(with_switches(base), **{"model.memory.value_projections": 4})),
        ),
        "plain_values": (
            "3: pre-values",
            refit(base, override(with_switches(base), **{"model.memory.pre_values": False})),
        ),
        "gelu_gate": (
            "3: no activation on the pre-value gate",
            override(with_switches(base), **{"model.memory.activation": "gelu"}),
        ),
        "init_std0.02": ("4: principled init", override(base, **{"model.memory.value_init": "std0.02"})),
        "init_paper_formula": ("4: principled init", override(base, **{"model.memory.value_init": "paper"})),
        "d_key_h/4": ("5: D_k = h/2", refit(base, override(base, **{"model.memory.d_key": h // 4}))),
        "d_key_h": ("5: D_k = h/2", refit(base, override(base, **{"model.memory.d_key": h}))),
        "two_heads": (
            "5: one head",
            refit(
                base,
                override(
                    base,
                    **{
                        "model.memory.heads": 2,
                        "model.memory.d_key": d_key // 2,
                        "model.memory.topk": max(1, topk // 2),
                    },
                ),
            ),
        ),
    }
    return out


def variants(quick: bool) -> list[Variant]:
    scale = QUICK if quick else FULL
    return [
        Variant(name, experiment_train(config, scale["steps"], scale["eval_iters"]), labels={"undoes": undoes})
        for name, (undoes, config) in ablation_configs().items()
    ]


def run(variant: Variant, seed: int, quick: bool) -> dict:
    metrics, _ = train_and_measure(variant.config)
    return metrics


def verdict_notes(result: dict, subject: str) -> list[str]:
    """One line per variant: its val loss against the baseline's, and whether ``subject`` helps.

    The change 'helps' when undoing it raises the loss by more than twice the standard error of the
    difference of the means (:func:`minimem_tools.experiments.claims.better`, the rule of ``results/README.md``).
    """
    from minimem_tools.experiments.claims import NOT_REPRODUCED, REPRODUCED, better, decision_bar

    base = stat(result, "baseline", "val_loss")
    lines = []
    for entry in result["summary"]:
        if entry["name"] == "baseline":
            continue
        s = stat(result, entry["name"], "val_loss")
        if math.isnan(s[0]) or math.isnan(base[0]):
            continue
        bar = decision_bar(s, base) if s[2] > 1 and base[2] > 1 else float("nan")
        verdict = {REPRODUCED: "helps", NOT_REPRODUCED: "hurts"}.get(better(base, s), "within noise")
        lines.append(
            f"{entry['name']}: val loss {s[0]:.3f} vs baseline {base[0]:.3f} (delta {s[0] - base[0]:+.3f}, "
            f"2 SE {bar:.3f}): {subject} {verdict}"
        )
    return lines


def notes(result: dict) -> list[str]:
    lines = verdict_notes(result, "the UltraMemV2 choice")
    for name, reason in NOT_RUN.items():
        lines.append(f"not run: {name}: {reason}")
    return lines


def baseline_plot(result: dict, out_dir: Path, stem: str, title: str) -> list[Path]:
    """Bars of every variant's validation loss, the baseline's as a dashed line."""
    fig, (ax,) = new_figure(width=6.0)
    names = [e["name"] for e in result["summary"]]
    bar_chart(ax, result, names, "val_loss")
    values = [stat(result, n, "val_loss")[0] for n in names]
    finite = [v for v in values if not math.isnan(v)]
    if finite:
        ax.set_ylim(min(finite) - 0.05, max(finite) + 0.05)
    base = stat(result, "baseline", "val_loss")[0]
    if not math.isnan(base):
        ax.axhline(base, color="k", lw=0.8, ls="--")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, out_dir, stem)


def plot(result: dict, out_dir: Path) -> list[Path]:
    return baseline_plot(result, out_dir, NAME, "UltraMemV2 ablations: validation loss (lower is better)")
