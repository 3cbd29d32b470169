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

from pathlib import Path

from minimem_tools.experiments.ablations import baseline_plot, refit, verdict_notes
from minimem_tools.experiments.runner import Variant
from minimem_tools.experiments.setups import experiment_train, model_config, override, train_and_measure

NAME = "ultramem_ablations"
CLAIM = (
    "UltraMem's mechanisms each help over product keys: no softmax, multi-core scoring, implicit value "
    "expansion, Tucker rank 2 retrieval, a raised value learning rate ([UM] §3-4, Table 5)."
)
FULL = dict(steps=300, eval_iters=20)
QUICK = dict(steps=3, eval_iters=1)
TABLE = [("val_loss", ".3f"), ("train_loss", ".3f"), ("params_activated", ",.0f"), ("params_total", ",.0f")]
BASELINE = "ultramem"


def ablation_configs() -> dict[str, tuple[str, dict]]:
    """name -> (which mechanism it removes, config)."""
    base = model_config(BASELINE)
    return {
        "baseline": ("none", base),
        "softmax": ("no softmax", override(base, **{"model.memory.softmax": True})),
        "one_core": ("multi-core scoring", override(base, **{"model.memory.cores": 1})),
        "no_ive": ("implicit value expansion", refit(base, override(base, **{"model.memory.expansion": 1}))),
        "rank1": ("Tucker rank 2", refit(base, override(base, **{"model.memory.rank": 1}))),
        "value_lr_1x": (
            "value LR 4x -> 1x",
            override(base, **{"train.value_lr_mult": 1.0, "train.value_lr_schedule": "constant"}),
        ),
    }


def variants(quick: bool) -> list[Variant]:
    scale = QUICK if quick else FULL
    return [
        Variant(name, experiment_train(config, scale["steps"], scale["eval_iters"]), labels={"removes": removes})
        for name, (removes, config) in ablation_configs().items()
    ]


def run(variant: Variant, seed: int, quick: bool) -> dict:
    metrics, _ = train_and_measure(variant.config)
    return metrics


def notes(result: dict) -> list[str]:
    return verdict_notes(result, "UltraMem's mechanism")


def plot(result: dict, out_dir: Path) -> list[Path]:
    return baseline_plot(result, out_dir, NAME, "UltraMem ablations: validation loss (lower is better)")
