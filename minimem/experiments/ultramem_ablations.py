"""UltraMem ablations: remove each of its mechanisms over PKM in turn ([UM] §3-4, Table 5).

Baseline: ``configs/shakespeare-ultramem.yaml`` (TDQKR rank 2, 2 scoring cores, implicit value
expansion E = 4, no softmax, skip-layer placement, value LR 4x decaying to 1x). [UM]'s ablation
table adds the changes to PKM one at a time; this experiment takes them away one at a time
from the full layer, at the baseline's activated parameters (the FFN width is refitted when a
variant changes them):

- ``softmax``: the softmax over the m scores put back ([UM] §3: removing it helped);
- ``one_core``: c = 1, no multi-core scoring ([UM] §3.2);
- ``no_ive``: E = 1, one projection and no virtual slots ([UM] §3.3); the FFN absorbs the
  3 D_v h activated parameters of the dropped projections;
- ``rank1``: Tucker rank r = 1, i.e. a product-key grid scored by one row and one column
  query ([UM] §3.1: TDQKR's rank 2 against plain product keys);
- ``value_lr_1x``: the value table at the base learning rate instead of 4x decaying to 1x ([UM] §4).

The skip-layer placement is not ablated: [UM] §3.4 introduces it to overlap the memory read
with the blocks in between (a latency device), and the model requires j > i.
"""
from __future__ import annotations

import math
from pathlib import Path

from minimem.experiments.runner import Variant, bar_chart, new_figure, save_figure, stat
from minimem.experiments.setups import (
    experiment_train, get, match_parameters, model_config, override, parameters, train_and_measure,
)

NAME = "ultramem_ablations"
CLAIM = ("UltraMem's mechanisms each help over product keys: no softmax, multi-core scoring, implicit value "
         "expansion, Tucker rank 2 retrieval, a raised value learning rate ([UM] §3-4, Table 5).")
FULL = dict(steps=300, eval_iters=20)
QUICK = dict(steps=3, eval_iters=1)
TABLE = [("val_loss", ".3f"), ("train_loss", ".3f"), ("params_activated", ",.0f"), ("params_total", ",.0f")]
BASELINE = "ultramem"


def _refit(base: dict, config: dict) -> dict:
    """``config`` with its FFN width refitted to the baseline's activated parameters."""
    target = parameters(base)["activated"]
    return match_parameters(config, "model.ffn_hidden", target, "activated", start=get(config, "model.ffn_hidden"))


def ablation_configs() -> dict[str, tuple[str, dict]]:
    """name -> (which mechanism it removes, config)."""
    base = model_config(BASELINE)
    return {
        "baseline": ("none", base),
        "softmax": ("no softmax", override(base, **{"model.memory.softmax": True})),
        "one_core": ("multi-core scoring", override(base, **{"model.memory.cores": 1})),
        "no_ive": ("implicit value expansion", _refit(base, override(base, **{"model.memory.expansion": 1}))),
        "rank1": ("Tucker rank 2", _refit(base, override(base, **{"model.memory.rank": 1}))),
        "value_lr_1x": ("value LR 4x -> 1x", override(
            base, **{"train.value_lr_mult": 1.0, "train.value_lr_schedule": "constant"})),
    }


def variants(quick: bool) -> list[Variant]:
    scale = QUICK if quick else FULL
    return [Variant(name, experiment_train(config, scale["steps"], scale["eval_iters"]), labels={"removes": removes})
            for name, (removes, config) in ablation_configs().items()]


def run(variant: Variant, seed: int, quick: bool) -> dict:
    metrics, _ = train_and_measure(variant.config)
    return metrics


def notes(result: dict) -> list[str]:
    base = stat(result, "baseline", "val_loss")
    lines = []
    for entry in result["summary"]:
        if entry["name"] == "baseline":
            continue
        s = stat(result, entry["name"], "val_loss")
        if math.isnan(s[0]) or math.isnan(base[0]):
            continue
        spread = math.sqrt(s[1] ** 2 + base[1] ** 2) if s[2] > 1 else float("nan")
        verdict = "helps" if s[0] - base[0] > spread else "hurts" if base[0] - s[0] > spread else "within noise"
        lines.append(f"{entry['name']}: val loss {s[0]:.3f} vs baseline {base[0]:.3f} (delta {s[0] - base[0]:+.3f}, "
                     f"spread {spread:.3f}): UltraMem's mechanism {verdict}")
    return lines


def plot(result: dict, out_dir: Path) -> list[Path]:
    fig, (ax,) = new_figure(width=6.0)
    names = [e["name"] for e in result["summary"]]
    bar_chart(ax, result, names, "val_loss")
    finite = [v for v in (stat(result, n, "val_loss")[0] for n in names) if not math.isnan(v)]
    if finite:
        ax.set_ylim(min(finite) - 0.05, max(finite) + 0.05)
    base = stat(result, "baseline", "val_loss")[0]
    if not math.isnan(base):
        ax.axhline(base, color="k", lw=0.8, ls="--")
    ax.set_title("UltraMem ablations: validation loss (lower is better)", fontsize=9)
    return save_figure(fig, out_dir, NAME)
