"""Activation density: top-m against total slots N for UltraMemV2 ([UM2] §5, Specification §4).

[UM2]: "activation density beats total size": top-768 with 60B total parameters beats top-256
with 120B total. In miniature: the UltraMemV2 config (``configs/shakespeare-ultramemv2.yaml``)
on a grid of slots per layer N in {1024, 4096, 16384} and top-m in {8, 16, 32}, everything
else fixed. A row of the grid holds the total parameter budget fixed and raises the activated
values; a column holds m fixed and raises the total. The claim is tested on the pairs
(N / 4, 2m) against (N, m): twice the values read per token with a quarter of the table.
"""

from __future__ import annotations

import math
from pathlib import Path

from minimem_tools.experiments.runner import Variant, errorbar, new_figure, save_figure, stat
from minimem_tools.experiments.setups import experiment_train, model_config, override, train_and_measure

NAME = "density"
CLAIM = (
    "UltraMemV2: more activated values (top-m) beats more total values (slots N) "
    "([UM2] §5: top-768/60B beats top-256/120B)."
)
SLOTS = (1024, 4096, 16384)  # N per layer (n = 32, 64, 128)
TOPK = (8, 16, 32)  # m
FULL = dict(steps=300, eval_iters=20)
QUICK = dict(steps=3, eval_iters=1)
TABLE = [("val_loss", ".3f"), ("train_loss", ".3f"), ("params_total", ",.0f"), ("params_activated", ",.0f")]


def name_of(n_slots: int, topk: int) -> str:
    return f"N={n_slots}/m={topk}"


def variants(quick: bool) -> list[Variant]:
    scale = QUICK if quick else FULL
    base = model_config("ultramemv2")
    out = []
    for n_slots in SLOTS:
        for topk in TOPK:
            config = override(base, **{"model.memory.n_slots": n_slots, "model.memory.topk": topk})
            out.append(
                Variant(
                    name_of(n_slots, topk),
                    experiment_train(config, scale["steps"], scale["eval_iters"]),
                    labels={"n_slots": n_slots, "topk": topk},
                )
            )
    return out


def run(variant: Variant, seed: int, quick: bool) -> dict:
    metrics, _ = train_and_measure(variant.config)
    return metrics


def pairs() -> list[tuple[str, str]]:
    """(denser, bigger): (N / 4, 2m) against (N, m), for every such pair on the grid."""
    out = []
    for n_slots in SLOTS:
        for topk in TOPK:
            dense_n, dense_m = n_slots // 4, 2 * topk
            if dense_n in SLOTS and dense_m in TOPK:
                out.append((name_of(dense_n, dense_m), name_of(n_slots, topk)))
    return out


def notes(result: dict) -> list[str]:
    lines, wins, deltas = [], 0, []
    for denser, bigger in pairs():
        a, b = stat(result, denser, "val_loss"), stat(result, bigger, "val_loss")
        if math.isnan(a[0]) or math.isnan(b[0]):
            continue
        deltas.append(a[0] - b[0])
        wins += a[0] < b[0]
        lines.append(
            f"{denser} vs {bigger}: val loss {a[0]:.3f} ± {a[1]:.3f} vs {b[0]:.3f} ± {b[1]:.3f} "
            f"(delta {a[0] - b[0]:+.3f})"
        )
    if deltas:
        lines.insert(
            0,
            f"denser-but-smaller wins {wins} of {len(deltas)} pairs (N/4, 2m) vs (N, m); "
            f"mean delta {sum(deltas) / len(deltas):+.3f} (negative = denser better)",
        )
    return lines


def plot(result: dict, out_dir: Path) -> list[Path]:
    fig, (ax_m, ax_n) = new_figure(ncols=2)
    for n_slots in SLOTS:
        errorbar(ax_m, result, [name_of(n_slots, m) for m in TOPK], "val_loss", list(TOPK), label=f"N = {n_slots}")
    ax_m.set_xscale("log", base=2)
    ax_m.set_xlabel("top-m (activated values per token per layer)")
    ax_m.set_ylabel("validation loss")
    ax_m.legend(fontsize=8)
    ax_m.set_title("loss against activation density", fontsize=9)
    for topk in TOPK:
        errorbar(ax_n, result, [name_of(n, topk) for n in SLOTS], "val_loss", list(SLOTS), label=f"m = {topk}")
    ax_n.set_xscale("log", base=2)
    ax_n.set_xlabel("slots N per layer (total values)")
    ax_n.set_ylabel("validation loss")
    ax_n.legend(fontsize=8)
    ax_n.set_title("loss against table size", fontsize=9)
    return save_figure(fig, out_dir, NAME)
